"""Interleaved A/B of whole training steps of the default minc-train run (augment 2 views,
4 forwards, loss, backward, AdamW, EMA), old path (fp32, NCHW) vs channels_last vs
channels_last + bf16 autocast.  Reports wall and process-CPU seconds per step (CPU time per
step of a 1-thread run estimates its wall time on an idle core when the machine is shared).

    .venv/bin/python benchmarks/results/train-default-cpu-<date>/step_ab.py --threads 1
"""
import argparse
import contextlib
import os
import platform
import statistics
import time

import torch

from minc_train import methods as M
from minc_train.cli import resolve_config
from minc_train.engine import Trainer

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
ap.add_argument("--variants", default="fp32-nchw,fp32-cl,bf16-cl")
a = ap.parse_args()


def make(variant):
    prec, layout = variant.split("-")
    cfg = resolve_config(["--out-dir", "/tmp/step_ab", "--threads", str(a.threads), "--no-progress",
                          "--amp", "none"])
    tr = Trainer(cfg)
    tr.train_mode()
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    tr.model.to(memory_format=fmt)
    tr.target.target.to(memory_format=fmt)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else contextlib.nullcontext)
    it = tr.batches(0)

    def step():
        x1, x2 = next(it)
        x1, x2 = x1.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt)
        with (amp() if callable(amp) else amp):
            out = M.forward_views(tr.model, tr.target, x1, x2)
        loss = M.compute_loss("minc", tr.loss_fn, out)
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()
        M.update_target(tr.target, tr.step, tr.total_steps, cfg.ema_base, backend=cfg.ema_backend)
        tr.step += 1
    if prec == "bf16":
        amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    step()
    step()  # warm-up (oneDNN primitives)
    return step


torch.set_num_threads(a.threads)
variants = a.variants.split(",")
steps = {v: make(v) for v in variants}
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
print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
      f"{a.threads} thread(s); load average before {load0[0]:.2f} after {load1[0]:.2f} (1 min)")
print(f"{'variant':12s} {'wall s/step (median, min)':>28s} {'CPU s/step (median, min)':>28s}")
for v in variants:
    print(f"{v:12s} {statistics.median(wall[v]):14.3f} {min(wall[v]):12.3f} "
          f"{statistics.median(cpu[v]):15.3f} {min(cpu[v]):12.3f}")
