"""CPU overhead of the library's default calls against hand-written eager PyTorch (issue 13).

Measures, on one thread, interleaved (every round runs every provider once, so a load
change on a shared machine hits all of them alike), medians over many rounds:

* ``MINCLoss`` forward + backward at B=1024, k=128 (the default ``feature_norm`` and the raw
  form) against a hand-written eager loss computing the same thing: the EMA of M with bias
  correction, the loss, ``backward()``.  Target: overhead <= 10 %.
* ``ema_update_(targets, onlines, m)`` (every default) against
  ``torch._foreach_lerp_(targets, onlines, 1 - m)`` on the fp32 parameter sets of a
  ResNet-18 and a ResNet-50 (built from their shapes).  Target: speed >= 1.0x.
* ``MomentumEncoder(online).update(m)`` on torchvision's ResNet-18/50 (parameters and
  BatchNorm buffers) against timm's ``ModelEmaV3`` (target: speed >= 1.0x) and against the
  bare foreach calls on lists built once (a lower bound: no walk of the modules).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_overhead.py [--rounds N] [--repeats N] [--only minc|ema] [--out DIR]

Writes ``results.json`` and ``results.md`` under
``benchmarks/results/cpu-overhead-<date>/`` (or ``--out``), naming the machine, its load
and the exact calls.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import minc_kernels as mk

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- parameter sets
def resnet_param_shapes(depth: int) -> list[tuple[int, ...]]:
    """The trainable parameter shapes of torchvision's resnet18/resnet50 (1000 classes)."""
    blocks, bottleneck = {18: ([2, 2, 2, 2], False), 50: ([3, 4, 6, 3], True)}[depth]
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for stage, n in enumerate(blocks):
        width = 64 * 2 ** stage
        cout = width * (4 if bottleneck else 1)
        for b in range(n):
            if bottleneck:
                shapes += [(width, cin, 1, 1), (width,), (width,),
                           (width, width, 3, 3), (width,), (width,),
                           (cout, width, 1, 1), (cout,), (cout,)]
            else:
                shapes += [(width, cin, 3, 3), (width,), (width,),
                           (width, width, 3, 3), (width,), (width,)]
            if b == 0 and (stage > 0 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    shapes += [(1000, cin), (1000,)]
    return shapes


# torchvision's documented parameter counts: the shapes above must reproduce them.
RESNET_NUMEL = {18: 11_689_512, 50: 25_557_032}


class ParamSet(nn.Module):
    def __init__(self, shapes, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.params = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g)) for s in shapes])


# --------------------------------------------------------------------------- timing
def interleaved(providers: dict, rounds: int, warmup: int) -> dict:
    """Per provider, run ``rounds`` rounds (each in a fresh random order): medians and quartiles (ms) of the
    thread's CPU time (``time.thread_time``: the basis of the verdicts, since on a shared
    machine it leaves out the time this thread waits for a core) and of wall time."""
    for _ in range(warmup):
        for fn in providers.values():
            fn()
    cpu = {name: [] for name in providers}
    wall = {name: [] for name in providers}
    rng = random.Random(0)
    order = list(providers)
    for _ in range(rounds):
        rng.shuffle(order)  # no provider always runs right after another (cache, turbo)
        for name in order:
            fn = providers[name]
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            c1, w1 = time.thread_time(), time.perf_counter()
            cpu[name].append((c1 - c0) * 1e3)
            wall[name].append((w1 - w0) * 1e3)
    out = {}
    for name in providers:
        qc, qw = statistics.quantiles(cpu[name], n=4), statistics.quantiles(wall[name], n=4)
        out[name] = {"median_ms": statistics.median(cpu[name]), "q1_ms": qc[0], "q3_ms": qc[2],
                     "wall_median_ms": statistics.median(wall[name]), "wall_q1_ms": qw[0],
                     "wall_q3_ms": qw[2], "rounds": rounds, "_cpu_ms": cpu[name]}
    return out


def paired_speed(r: dict, name: str, base: str) -> dict:
    """Per round, baseline time / library time (the two ran in the same round, so a load
    change that hits both cancels): median and quartiles, and the share of rounds the
    library was faster."""
    ratios = [b / x for b, x in zip(r[base]["_cpu_ms"], r[name]["_cpu_ms"]) if x > 0]
    q = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2],
            "faster_share": sum(x > 1.0 for x in ratios) / len(ratios)}


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


# --------------------------------------------------------------------------- MINC
def minc_providers(b: int, k: int, feature_norm: str, beta: float = 0.99) -> dict:
    g = torch.Generator().manual_seed(0)
    p = torch.randn(b, k, generator=g, requires_grad=True)
    t = torch.randn(b, k, generator=g)
    loss_fn = mk.MINCLoss(k, moment_momentum=beta, feature_norm=feature_norm)

    def library():
        loss_fn(p, t).backward()
        p.grad = None

    state = {"m": torch.zeros(k, k), "n": 0}

    def eager():
        # What one would write by hand: same math, no checks, a Python step counter.
        with torch.no_grad():
            tn = F.normalize(t, dim=1) if feature_norm == "l2" else t
            state["m"].lerp_(tn.T @ tn / b, 1 - beta)
            state["n"] += 1
            m = state["m"] / (1 - beta ** state["n"])
        pn = F.normalize(p, dim=1) if feature_norm == "l2" else p
        loss = (-2 * (pn * tn).sum() + ((pn @ m) * pn).sum()) / b
        loss.backward()
        p.grad = None

    return {"eager": eager, "minc_kernels": library}


# --------------------------------------------------------------------------- EMA
def ema_providers(depth: int, momentum: float = 0.996) -> dict:
    """``ema_update_`` on a ResNet's parameter set against ``torch._foreach_lerp_``."""
    shapes = resnet_param_shapes(depth)
    online, target = ParamSet(shapes, 1), ParamSet(shapes, 2)
    for q in target.parameters():
        q.requires_grad_(False)
    onl = [q.detach() for q in online.parameters()]
    tgt = list(target.parameters())

    def foreach():
        with torch.no_grad():
            torch._foreach_lerp_(tgt, onl, 1.0 - momentum)

    return {
        "torch._foreach_lerp_": foreach,
        # The baseline again, as a control: its ratio to the baseline is the noise floor.
        "torch._foreach_lerp_ (control)": foreach,
        "ema_update_": lambda: mk.ema_update_(tgt, onl, momentum),
    }, sum(torch.Size(s).numel() for s in shapes), len(shapes)


def encoder_providers(depth: int, momentum: float = 0.996) -> tuple[dict, int, int]:
    """``MomentumEncoder.update`` on a torchvision ResNet (parameters and BatchNorm buffers:
    module in, module out) against timm's ``ModelEmaV3`` (the same semantics: floating
    buffers averaged, integer ones copied; skipped without timm) and against the bare
    foreach calls on lists built once (what the update costs without walking the modules)."""
    import torchvision

    online = getattr(torchvision.models, f"resnet{depth}")()
    enc = mk.MomentumEncoder(online)
    lerp_t = [*enc.target.parameters(), *(b for b in enc.target.buffers() if b.is_floating_point())]
    lerp_o = [*online.parameters(), *(b for b in online.buffers() if b.is_floating_point())]
    copy_t = [b for b in enc.target.buffers() if not b.is_floating_point()]
    copy_o = [b for b in online.buffers() if not b.is_floating_point()]

    @torch.no_grad()
    def prebuilt():
        torch._foreach_lerp_(lerp_t, lerp_o, 1.0 - momentum)
        torch._foreach_copy_(copy_t, copy_o)

    providers = {"foreach on prebuilt lists": prebuilt,
                 "MomentumEncoder.update": lambda: enc.update(momentum)}
    try:
        from timm.utils.model_ema import ModelEmaV3
    except ImportError:
        pass
    else:
        ema = ModelEmaV3(online, decay=momentum)
        providers["timm ModelEmaV3"] = lambda: ema.apply_update_(online, momentum)
    return providers, len(lerp_t) + len(copy_t), sum(p.numel() for p in online.parameters())


# --------------------------------------------------------------------------- report
def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    from minc_kernels import _ext
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "minc_kernels": mk.__version__, "commit": commit,
            "torch_threads": torch.get_num_threads(),
            "ema_extension": "live" if _ext.status()[0] else f"unavailable: {_ext.status()[1]}"}


def _result(r: dict) -> str:
    return (f"{r['overhead_pct']:+.1f} % overhead" if "overhead_pct" in r
            else f"{r['speed_vs_baseline']:.2f}x")


def measure_rows(args) -> list[dict]:
    """One pass over every case: a row per (case, baseline)."""
    rows = []
    b, k = 1024, 128
    for fn_name in (mk.losses.MINC_DEFAULT_FEATURE_NORM, "none") if args.only != "ema" else ():
        r = interleaved(minc_providers(b, k, fn_name), args.rounds, warmup=30)
        lib, ref = r["minc_kernels"]["median_ms"], r["eager"]["median_ms"]
        paired = paired_speed(r, "minc_kernels", "eager")
        rows.append({
            "case": f"MINCLoss fwd+bwd B={b} k={k} feature_norm={fn_name!r}",
            "call": f"mk.MINCLoss({k}, moment_momentum=0.99, feature_norm={fn_name!r})(p, t).backward()",
            "baseline": "hand-written eager: EMA of M (lerp_), bias correction, loss, backward()",
            "library_ms": _public(r["minc_kernels"]), "baseline_ms": _public(r["eager"]),
            "overhead_pct": 100.0 * (lib / ref - 1.0), "paired_speed": paired,
            "target": "overhead <= 10 %", "met": lib / ref - 1.0 <= 0.10,
        })
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    for depth in depths if args.only != "minc" else ():
        providers, numel, ntensors = ema_providers(depth)
        assert numel == RESNET_NUMEL[depth], (depth, numel)
        r = interleaved(providers, args.ema_rounds, warmup=5)
        base = r["torch._foreach_lerp_"]["median_ms"]
        for name, call in (("torch._foreach_lerp_ (control)",
                            "torch._foreach_lerp_(targets, onlines, 1 - 0.996) again"),
                           ("ema_update_", "mk.ema_update_(targets, onlines, 0.996) (every default)")):
            med = r[name]["median_ms"]
            rows.append({
                "case": f"{name} ResNet-{depth} fp32 parameters ({ntensors} tensors, {numel:,} values)",
                "call": call, "baseline": "torch._foreach_lerp_(targets, onlines, 1 - 0.996)",
                "library_ms": _public(r[name]), "baseline_ms": _public(r["torch._foreach_lerp_"]),
                "speed_vs_baseline": base / med,
                "paired_speed": paired_speed(r, name, "torch._foreach_lerp_"),
                **({"target": "none (the noise floor)", "met": None} if "control" in name else
                   {"target": "speed >= 1.0x", "met": base / med >= 1.0}),
            })
        providers, ntensors, numel = encoder_providers(depth)
        r = interleaved(providers, args.ema_rounds, warmup=5)
        med = r["MomentumEncoder.update"]["median_ms"]
        for base_name, call, target in (
                ("timm ModelEmaV3", "timm.utils.ModelEmaV3(online).apply_update_(online, 0.996)",
                 "speed >= 1.0x"),
                ("foreach on prebuilt lists",
                 "torch._foreach_lerp_ + torch._foreach_copy_ on lists of the tensors built once",
                 "none (a lower bound: no module walk)")):
            if base_name not in r:
                continue
            base = r[base_name]["median_ms"]
            rows.append({
                "case": f"MomentumEncoder.update torchvision ResNet-{depth} fp32 "
                        f"({ntensors} parameters and buffers, {numel:,} parameter values)",
                "call": "mk.MomentumEncoder(online).update(0.996) (every default)",
                "baseline": call, "library_ms": _public(r["MomentumEncoder.update"]),
                "baseline_ms": _public(r[base_name]), "speed_vs_baseline": base / med,
                "paired_speed": paired_speed(r, "MomentumEncoder.update", base_name),
                "target": target, "met": base / med >= 1.0 if target.startswith("speed") else None,
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=400, help="timed rounds per MINC case (default 400)")
    ap.add_argument("--ema-rounds", type=int, default=150, help="timed rounds per EMA case (default 150)")
    ap.add_argument("--out", type=Path, default=None, help="output directory")
    ap.add_argument("--only", choices=("minc", "ema"), default=None,
                    help="run only the MINCLoss cases or only the EMA cases")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every case this many times (each run interleaved on its own); the "
                         "tables show every run and how many met the target")
    ap.add_argument("--depths", default="18,50", help="ResNet depths of the EMA cases (default 18,50)")
    ap.add_argument("--note", default="shared 2-core machine (other jobs running); medians of "
                    "interleaved rounds", help="how the machine was loaded")
    args = ap.parse_args()
    torch.set_num_threads(1)
    date = _dt.date.today().isoformat()
    out = args.out or RESULTS_ROOT / f"cpu-overhead-{date}"
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()

    runs = []
    for i in range(args.repeats):
        print(f"run {i + 1}/{args.repeats} ...", flush=True)
        runs.append(measure_rows(args))
    rows = runs[-1]
    meta = machine()
    meta.update({"date": date, "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
                 "note": args.note, "command": "OMP_NUM_THREADS=1 " + shlex.join([Path(sys.executable).name, *sys.argv])})
    (out / "results.json").write_text(json.dumps({"machine": meta, "runs": runs}, indent=2) + "\n")

    lines = [f"# CPU overhead, {date}", "",
             f"Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs, {meta['platform']}; "
             f"torch {meta['torch']}, 1 thread; EMA extension {meta['ema_extension']}; "
             f"commit {meta['commit']}.",
             f"Load: {args.note}; load average {load_start[0]:.2f} at start, "
             f"{meta['load_avg_end'][0]:.2f} at end.", "",
             f"Command: `{meta['command']}`", "",
             "Times: thread CPU time (`time.thread_time`), median and quartiles over the rounds; "
             "wall-clock medians in results.json.", "",
             "Paired speed: per round, baseline time / library time (both ran in that round); "
             "median (q1-q3) and the share of rounds where the library was faster.", "",
             "| case | call measured | baseline | library median (q1-q3) ms | baseline median (q1-q3) ms | result (ratio of medians) | paired speed | target |",
             "|---|---|---|---|---|---|---|---|"]
    if len(runs) > 1:
        lines[-2:] = ["## Every run", "",
                      "| case | baseline | result of each run (ratio of medians) | paired speed, median of each run | target met |",
                      "|---|---|---|---|---|"]
        for i, r in enumerate(runs[0]):
            per = [run[i] for run in runs]
            res = ", ".join(_result(x) for x in per)
            ps = ", ".join(f"{x['paired_speed']['median']:.3f}x" for x in per)
            met = ("-" if r["met"] is None
                   else f"{sum(bool(x['met']) for x in per)} of {len(per)} runs ({r['target']})")
            lines.append(f"| {r['case']} | {r['baseline']} | {res} | {ps} | {met} |")
        lines += ["", f"## The last run in full", "",
                  "| case | call measured | baseline | library median (q1-q3) ms | baseline median (q1-q3) ms | result (ratio of medians) | paired speed | target |",
                  "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lm, bm = r["library_ms"], r["baseline_ms"]
        ps = r["paired_speed"]
        verdict = "" if r["met"] is None else (": met" if r["met"] else ": NOT met")
        lines.append(f"| {r['case']} | `{r['call']}` | {r['baseline']} | "
                     f"{lm['median_ms']:.3f} ({lm['q1_ms']:.3f}-{lm['q3_ms']:.3f}) | "
                     f"{bm['median_ms']:.3f} ({bm['q1_ms']:.3f}-{bm['q3_ms']:.3f}) | {_result(r)} | "
                     f"{ps['median']:.3f}x ({ps['q1']:.3f}-{ps['q3']:.3f}), faster in "
                     f"{100 * ps['faster_share']:.0f} % | {r['target']}{verdict} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
