"""End-to-end SSL training-step benchmark: eager losses + ``torch._foreach_lerp_`` EMA vs
minc_kernels.

Two providers per method, same model, data and optimiser:

* ``eager``: losses with ``backend="reference"``, EMA ``ema_update_(backend="foreach")``;
* ``minc_kernels``: losses with ``backend="auto"`` (Triton kernels on CUDA), EMA
  ``backend="auto"`` (the compiled extension when built).

A step = two views through the online network (and the EMA target for MINC), the loss,
backward, LARS step, EMA update.  Reported per provider: median step time, the loss's
own forward+backward time (timed in isolation on the step's real outputs) and the EMA
update time, and their shares of the step.  Synthetic inputs (no data loading).

GPU default: ResNet-50, batch 256, 224 px, bf16 autocast, channels_last, BYOL heads
(2048→4096→256).  CPU default (``--tiny`` implied): a small conv net, batch 32, 28 px.

    python -m minc_train.bench_step --out examples/results/train_step
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

# The training program's wiring of each method (heads, symmetric MINC call, EMA step).
from . import methods as M
from .models import build_backbone
from .optim import build_optimizer

# examples/results/train_step, wherever it is run from
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                           "train_step")
PROVIDERS = {"eager": ("reference", "foreach"), "minc_kernels": ("auto", "auto")}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timeit(fn, dev):
    _sync(dev)
    t = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, (time.perf_counter() - t) * 1e3


def build(cfg, method, dev, loss_backend):
    torch.manual_seed(0)
    bb, dim = build_backbone(cfg.arch, 3, cfg.stem, cfg.image_size, cfg.width, 1)
    model = M.build_model(method, bb, dim, cfg.hidden, cfg.dim, 2, cfg.hidden).to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    target = M.build_target(method, model)
    loss = M.build_loss(method, cfg.dim, backend=loss_backend).to(dev)
    opt = build_optimizer("lars", model, 0.1, 1e-6)
    return model, target, loss, opt


def bench(cfg, method, provider, dev):
    loss_backend, ema_backend = PROVIDERS[provider]
    model, target, loss_fn, opt = build(cfg, method, dev, loss_backend)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else None
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (cfg.batch, 3, cfg.image_size, cfg.image_size)
    x1 = torch.randn(shape, generator=g).to(dev)
    x2 = torch.randn(shape, generator=g).to(dev)
    if dev.type == "cuda":
        x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
    total = cfg.warmup + cfg.steps

    def forward():
        if amp is not None:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return _forward()
        return _forward()

    def _forward():
        return M.forward_views(model, target, x1, x2)

    def loss_of(out):
        return M.compute_loss(method, loss_fn, out)

    steps, losses, emas = [], [], []
    for i in range(total):
        _sync(dev)
        t0 = time.perf_counter()
        outs = forward()
        loss = loss_of(outs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target is not None:
            _, ema_ms = _timeit(lambda: M.update_target(target, i, total, backend=ema_backend,
                                                        check_finite=False), dev)
        else:
            ema_ms = 0.0
        _sync(dev)
        step_ms = (time.perf_counter() - t0) * 1e3
        # the loss alone, forward + backward, on this step's (detached) outputs
        # (targets stay without grad, as in the step)
        detached = M.ViewOutputs(*(None if o is None else o.detach().requires_grad_(k < 4)
                                   for k, o in enumerate(outs)))
        _, loss_ms = _timeit(lambda: loss_of(detached).backward(), dev)
        if i >= cfg.warmup:
            steps.append(step_ms)
            losses.append(loss_ms)
            emas.append(ema_ms)
    med = statistics.median
    return {"step_ms": med(steps), "loss_fwd_bwd_ms": med(losses), "ema_ms": med(emas),
            "loss_share": med(losses) / med(steps), "ema_share": med(emas) / med(steps),
            "steps_timed": len(steps), "loss_backend": loss_backend, "ema_backend": ema_backend}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minc_train.bench_step",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for train_step.json")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--methods", default="minc,spectral,mio")
    p.add_argument("--tiny", action="store_true", help="the small CPU configuration (default on the CPU)")
    p.add_argument("--arch", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    dev = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and dev.type != "cuda":
        p.error("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.tiny or dev.type == "cpu"
    base = (dict(arch="convnet", stem="auto", width=8, batch=32, image_size=28, hidden=256, dim=64,
                 amp="none", steps=5, warmup=2) if tiny else
            dict(arch="resnet50", stem="imagenet", width=32, batch=256, image_size=224, hidden=4096,
                 dim=256, amp="bf16", steps=20, warmup=5))
    for k in ("arch", "batch", "image_size", "steps", "warmup"):
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    cfg = argparse.Namespace(**base)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in ("minc", "spectral", "mio"):
            p.error(f"--methods: unknown method {m!r}")
    results = {}
    for m in methods:
        results[m] = {}
        for prov in PROVIDERS:
            r = bench(cfg, m, prov, dev)
            results[m][prov] = r
            print(f"{m:9s} {prov:13s} step {r['step_ms']:9.2f} ms  loss {r['loss_fwd_bwd_ms']:8.3f} ms "
                  f"({100 * r['loss_share']:.1f}%)  ema {r['ema_ms']:7.3f} ms ({100 * r['ema_share']:.1f}%)",
                  flush=True)
        e, k = results[m]["eager"], results[m]["minc_kernels"]
        results[m]["step_speedup"] = e["step_ms"] / k["step_ms"]
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "config": vars(cfg),
            "note": ("on the CPU both providers run the eager code (backend auto -> reference, EMA "
                     "auto -> foreach without a built extension): a smoke run, not a comparison"
                     if dev.type == "cpu" else "GPU: Triton kernels / extension vs eager"), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train_step.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
