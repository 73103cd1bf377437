import importlib.metadata
import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "perturbench_devel.h5ad"

# Deterministic, comparable runs: the suite is sized for a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared dataset not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spinning on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def triton_interpreter():
    """For tests that run the Triton kernels under TRITON_INTERPRET=1 (in a subprocess)."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("triton is not installed")
    try:
        int(np.zeros(1))
    except TypeError:
        # Triton's interpreter before 3.7 turns scalar kernel arguments used as loop bounds into
        # int(array of shape (1,)), which NumPy >= 2.4 refuses (seen with triton 3.6, numpy 2.5)
        if tuple(int(p) for p in version.split(".")[:2]) < (3, 7):
            pytest.skip(f"triton {version}'s interpreter does not run with numpy {np.__version__}")
