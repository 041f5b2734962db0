"""Set-up of the application's tests (``make test`` runs them after the library's).

The program's losses may reach the Triton kernels (``--backend auto|triton``): without a CUDA
device they run under Triton's interpreter, whose environment variable must be set before
triton is imported, hence here, at collection time (as the library's tests/conftest.py).
"""
import gzip
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def write_tiny_fashion_mnist(root, n_train=96, n_test=48, seed=0):
    """Idx .gz files of 28-px images in 3 classes: a bright band at a class-specific height."""
    from minc_train import data as D
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        y = torch.arange(n) % 3
        x = torch.rand(n, 28, 28, generator=g) * 60
        for c in range(3):
            x[y == c, 4 + 7 * c: 11 + 7 * c, 6:22] += 180
        x = x.clamp(0, 255).to(torch.uint8)
        fi, fl = D.FASHION_MNIST_FILES[split]
        with gzip.open(os.path.join(root, fi), "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                    + x.numpy().tobytes())
        with gzip.open(os.path.join(root, fl), "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(y.tolist()))
    return str(root)


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory):
    """A tiny generated Fashion-MNIST (96 training, 48 test images): ``--data-dir`` for it."""
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"))
