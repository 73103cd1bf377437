"""The process's heap policy for repeated large CPU work (training steps, evaluation blocks)."""

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """glibc: serve large tensors from the heap and keep freed memory in the process.

    By default glibc maps every block above the (dynamic, at most 32 MB) mmap threshold freshly from
    the kernel and unmaps it on free, so each training step or evaluation block page-faults (and the
    kernel zero-fills) its buffers again: ~10-20 % of a CPU training step at the authors' model size,
    ~10 % of a warm evaluation. The price: memory freed after the peak is not returned to the system
    (the RSS stays at the peak). Process-wide: training calls it (config `train.keep_freed_memory`)
    and so does `perturbdiff evaluate`, but not the `evaluate` function, whose host process is the
    caller's.
    No-op (False) where glibc's mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
