"""Peak extra memory of one call.

CPU: tracemalloc cannot see torch's allocations, so this reads the kernel's resident-set peak:
glibc is told to serve every large block by mmap (returned to the OS on free, so freed temporaries
do not hide later ones), the peak (VmHWM) is reset to the current RSS through
/proc/self/clear_refs, the call runs, and the new peak minus the starting RSS is the extra memory.
Run it in a process of its own (the runner's per-case worker) so other work does not interleave.
GPU: torch.cuda.max_memory_allocated over the call minus what was allocated before.
"""

import ctypes
import ctypes.util
import functools
import gc
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
_MMAP_THRESHOLD = 128 * 1024
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
        lib.mallopt, lib.malloc_trim  # noqa: B018  (glibc only)
        return lib
    except (OSError, AttributeError, TypeError):
        return None


_LIBC = _libc()


def configure_process() -> None:
    """Call once, after the imports. Makes freed large blocks go back to the OS at once (a fixed
    mmap threshold also stops glibc from raising it after the first big free, which would keep
    later blocks on the heap)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    gc.freeze()  # the imported modules' objects: later collections skip them (0.3 s -> ms)


@functools.cache
def cpu_supported() -> str:
    """'' when peaks can be measured here, else why not."""
    if not _STATUS.exists():
        return "/proc/self/status is missing (not Linux)"
    try:
        _CLEAR_REFS.write_text("5")
    except OSError as exc:
        return f"cannot reset the RSS peak ({exc})"
    return ""


def _kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in {_STATUS}")


def peak_extra_bytes(run, device: torch.device) -> int | None:
    """Bytes allocated at peak during ``run()`` beyond what was resident before (None: unknown)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    if cpu_supported():
        return None
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    _CLEAR_REFS.write_text("5")
    base = _kib("VmRSS")
    out = run()
    peak = _kib("VmHWM")
    del out
    return max(peak - base, 0) * 1024
