"""Shared test set-up.

Without a CUDA device the Triton kernels run under Triton's interpreter: the
environment variable must be set before triton (or any kernel module) is imported,
which is why it is set here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _column_statistics_split_at_test_shapes(monkeypatch):
    """The column statistics of Barlow Twins / VICReg split their rows only for launches
    worth >= 2.5 us of copy traffic (ops.gram.COLSTATS_SPLIT_MIN_SECONDS), which no test
    shape reaches: without the threshold, the tests take the split wherever the column
    blocks leave SMs idle (k <= 16 under the interpreter's 2 stand-in SMs)."""
    try:
        from minc_kernels.ops import gram
    except ImportError:  # no triton: no kernels to test
        return
    monkeypatch.setattr(gram, "COLSTATS_SPLIT_MIN_SECONDS", 0.0)


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run in this session: CUDA if present, else the CPU interpreter."""
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")


@pytest.fixture
def rowmat_calls(monkeypatch):
    """The ``rowmat_kernel`` launches of the test, as ``(MODE, G's dtype, G, second view's
    G)`` (the G tensors cloned at launch); the launches still run."""
    from minc_kernels.kernels.gram import rowmat_kernel
    seen = []
    real = rowmat_kernel.run

    def spy(*args, **kwargs):
        g2 = args[7]
        seen.append((kwargs["MODE"], args[1].dtype, args[1].clone(),
                     g2.clone() if isinstance(g2, torch.Tensor) else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(rowmat_kernel, "run", spy)
    return seen
