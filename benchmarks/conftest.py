"""pytest-benchmark microbenchmarks (``pytest benchmarks -m benchmark``); not in the default run."""
import pytest
import torch


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
