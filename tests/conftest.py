"""Shared test set-up. Without a GPU, Triton kernels run in the interpreter on CPU tensors:
TRITON_INTERPRET must be set before any kernel module is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen():
    """A generator with a fresh seed per test (printed, so a failure can be replayed)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    return torch.Generator().manual_seed(seed)
