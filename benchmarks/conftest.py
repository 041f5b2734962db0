"""pytest-benchmark microbenchmarks (``pytest benchmarks -m benchmark``); not in the default run."""
import pytest
import torch


@pytest.fixture(scope="session")
def bench_device():
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
