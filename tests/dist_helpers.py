"""Spawning W gloo processes for the distributed tests (one copy for every test file)."""
from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for MASTER_PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args: tuple, nprocs: int, timeout_s: float = 240) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; fail the test (and kill them)
    if they do not all finish within ``timeout_s``; a worker's exception is re-raised."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish in {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
