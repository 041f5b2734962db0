"""Does one training step wait on the host?  ``torch.cuda.set_sync_debug_mode("error")``.

    python -m benchmarks.sync_check [--out OUT_DIR] [--device cuda|cpu] [--B 256 --k 128]

One step of each loss of ``minc_kernels.losses.REGISTRY`` on the public API only: an online
encoder and its :class:`minc_kernels.MomentumEncoder` target, the loss module's forward and
backward (a loss whose second input takes no gradient, MINC, in the symmetric call on the
target's outputs; the others on two online views), an optimizer step and
``MomentumEncoder.update``.
A warm-up step runs first (Triton compiles, the allocator grows); the checked step then runs
with the sync debug mode set to "error", so any ``.item()``, ``bool(tensor)`` or other
device-to-host wait raises, and the traceback names it.  Writes ``sync_check.json`` (one
entry per loss: ok / the error) into OUT_DIR.  Exit code 1 if any step synchronised.
Without CUDA (the CPU dry run in CI) the same steps run with no sync mode to check.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

import minc_kernels as mk
from minc_kernels.losses import REGISTRY


def _step(loss_fn, online, target, opt, x1, x2, against_target: bool):
    z1, z2 = online(x1), online(x2)
    with torch.no_grad():
        t1, t2 = target(x1), target(x2)
    if against_target:
        # the symmetric BYOL-style call (MINC: one EMA step of M for both pairs)
        loss = loss_fn((z1, z2), (t2, t1))
    else:
        loss = loss_fn(z1, z2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    target.update(0.99)
    return loss.detach()


def check(name: str, device: torch.device, b: int, k: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, k)).to(device)
    target = mk.MomentumEncoder(online)
    spec = REGISTRY[name]
    loss_fn = spec.module(**spec.module_kwargs(k)).to(device)
    # A loss whose second input takes no gradient compares the online network with the
    # target network's outputs (MINC); the others compare two online views.
    against_target = tuple(spec.grad_args) == (0,)
    opt = torch.optim.SGD(online.parameters(), lr=0.01, momentum=0.9)
    x1 = torch.randn(b, 64, device=device)
    x2 = torch.randn(b, 64, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    t0 = time.time()
    with autocast:
        _step(loss_fn, online, target, opt, x1, x2, against_target)  # warm-up: compiles
    entry = {"loss": name, "B": b, "k": k, "dtype": str(dtype).replace("torch.", ""),
             "device": str(device), "warmup_s": round(time.time() - t0, 2)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        with autocast:
            loss = _step(loss_fn, online, target, opt, x1, x2, against_target)
        entry["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report which call waited on the host
        entry["status"] = "error"
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc()[-4000:]
        loss = None
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    if loss is not None:
        entry["loss_value"] = float(loss)  # after the checked step: a sync here is allowed
        entry["sync_mode_checked"] = device.type == "cuda"
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for sync_check.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"),
                    help="autocast dtype of the step (fp32: no autocast)")
    ap.add_argument("--losses", default=",".join(REGISTRY),
                    help="comma list of minc_kernels.losses.REGISTRY names (default: all)")
    a = ap.parse_args(argv)
    bad = [n for n in a.losses.split(",") if n not in REGISTRY]
    if bad:
        ap.error(f"--losses: unknown {bad}; the registry has {list(REGISTRY)}")
    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    results = []
    for name in a.losses.split(","):
        entry = check(name, device, a.B, a.k, dtype)
        results.append(entry)
        print(f"{name:9s} {entry['status']:6s} {entry.get('error', '')}", flush=True)
        if a.out:  # written as it goes: a run cut short keeps what it got
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "sync_check.json").write_text(json.dumps(
                {"torch": torch.__version__, "results": results}, indent=1) + "\n")
    bad = [r for r in results if r["status"] != "ok"]
    print(f"sync check: {len(results) - len(bad)}/{len(results)} steps without a host sync"
          + ("" if device.type == "cuda" else " (CPU dry run: sync mode not checked)"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
