"""Interleaved A/B of whole training steps of the default ``minc-train`` run (augment 2 views,
4 forwards, loss, backward, AdamW, EMA): fp32 NCHW (the old path) vs channels_last vs
channels_last + bf16 autocast.  Reports wall and process-CPU seconds per step (the CPU time per
step of a 1-thread run estimates its wall time on an idle core when the machine is shared).
Needs the default run's data (Fashion-MNIST, as ``minc-train``).

    python -m minc_train.bench_step_ab --threads 1 --batch-size 256

``examples/results/train-default-cpu-2026-12-01/step_ab_1thread.txt`` is its output at batch 256
(run then as ``step_ab.py`` from that folder, the same code as a top-level script).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from . import methods as M
from .cli import resolve_config
from .engine import Trainer

VARIANTS = ("fp32-nchw", "fp32-cl", "bf16-cl")


def make_step(variant: str, threads: int, batch_size: int | None, out_dir: str,
              data_dir: str | None = None):
    """A closure running one training step of the default configuration in ``variant``
    (``<fp32|bf16>-<nchw|cl>``), after two warm-up steps (oneDNN primitives)."""
    prec, layout = variant.split("-")
    argv = ["--out-dir", out_dir, "--threads", str(threads), "--no-progress", "--amp", "none"]
    if batch_size:
        argv += ["--batch-size", str(batch_size)]
    if data_dir:
        argv += ["--data-dir", data_dir]
    cfg = resolve_config(argv)
    tr = Trainer(cfg)
    tr.train_mode()
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    tr.model.to(memory_format=fmt)
    tr.target.target.to(memory_format=fmt)
    batches = tr.batches(0)

    def autocast():
        return (torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16"
                else contextlib.nullcontext())

    def step():
        x1, x2 = next(batches)
        x1, x2 = x1.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt)
        with autocast():
            out = M.forward_views(tr.model, tr.target, x1, x2)
        loss = M.compute_loss("minc", tr.loss_fn, out)
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()
        M.update_target(tr.target, tr.step, tr.total_steps, cfg.ema_base, backend=cfg.ema_backend)
        tr.step += 1

    step()
    step()
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minc_train.bench_step_ab",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="batch of the steps (default: the program's default run)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the program's)")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants: unknown {bad or 'empty list'}; expected a subset of {', '.join(VARIANTS)}")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:  # the Trainer needs an --out-dir; nothing is written
        steps = {v: make_step(v, a.threads, a.batch_size, os.path.join(tmp, v), a.data_dir)
                 for v in variants}
        wall = {v: [] for v in variants}
        cpu = {v: [] for v in variants}
        load0 = os.getloadavg()
        for _ in range(a.rounds):
            for v in variants:
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(a.steps):
                    steps[v]()
                wall[v].append((time.perf_counter() - t0) / a.steps)
                cpu[v].append((time.process_time() - c0) / a.steps)
        load1 = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {a.threads} thread(s); load average before {load0[0]:.2f} after "
          f"{load1[0]:.2f} (1 min)")
    print(f"{'variant':12s} {'wall s/step (median, min)':>28s} {'CPU s/step (median, min)':>28s}")
    for v in variants:
        print(f"{v:12s} {statistics.median(wall[v]):14.3f} {min(wall[v]):12.3f} "
              f"{statistics.median(cpu[v]):15.3f} {min(cpu[v]):12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
