"""Median wall time (CUDA events on a GPU, ``perf_counter`` on the CPU) and peak memory.

Why not ``triton.testing.do_bench``: it sizes its repeat count from a time target with no
cap (10⁴ calls of a 10 µs op, each after a 256 MB cache flush), which a grid of hundreds
of cases cannot afford.  Here each case gets a time budget, a warm-up, and a repeat
count clamped to ``[min_reps, max_reps]``.  The L2 cache is not flushed between calls:
in training the loss inputs were just written by the projector, so a warm L2 is the
realistic state (the EMA lists and large cases exceed L2 anyway).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Budget:
    """Per-case limits: warm-up time, measurement time, repeat bounds (milliseconds)."""

    warmup_ms: float = 20.0
    measure_ms: float = 60.0
    min_reps: int = 5
    max_reps: int = 100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], None], device: torch.device, budget: Budget) -> dict:
    """``{"median_ms", "min_ms", "reps", "first_call_s"}`` of ``fn`` (warm-up excluded).

    The first call (compilation, autotuning) is timed separately as ``first_call_s``.
    """
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first_s = time.perf_counter() - t0
    # Warm-up, synchronising after every call so that a slow GPU op cannot queue up
    # seconds of work; its mean call time sizes the measurement.
    n_warm, t0 = 0, time.perf_counter()
    while True:
        fn()
        _sync(device)
        n_warm += 1
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        if n_warm >= 200 or (n_warm >= 2 and elapsed_ms >= budget.warmup_ms):
            break
    est = max(elapsed_ms / n_warm, 1e-3)
    floor = budget.min_reps if est * budget.min_reps <= 4 * budget.measure_ms else 1
    reps = int(min(max(budget.measure_ms / est, floor), budget.max_reps))
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        _sync(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps,
            "first_call_s": first_s}


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it (MB); None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def out_of_memory_errors() -> tuple[type, ...]:
    errs: list[type] = [MemoryError]
    for owner, name in ((torch, "OutOfMemoryError"), (torch.cuda, "OutOfMemoryError")):
        if hasattr(owner, name):
            errs.append(getattr(owner, name))
    return tuple(errs)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, out_of_memory_errors()):
        return True
    # torch.compile / Triton can wrap the allocator's error in their own exception types.
    text = str(exc)
    return "out of memory" in text.lower() and "CUDA" in text
