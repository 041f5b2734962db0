"""The machine's measured limits, so each case can be read as a fraction of them.

* copy: ``dst.copy_(src)`` of a large buffer, GB/s counting read + write (``2·bytes/t``);
* matmul: a large square ``torch.mm`` in the benchmark dtype, TFLOP/s (``2n³/t``);
* launch: the time per call of the cheapest device op from Python (``x.add_(1)`` on one
  element), timed like the cases (CUDA events around back-to-back calls), ms.  It is the
  floor of the smallest shapes, where a call costs its launches, not its arithmetic;
* custom_op: one ``torch.library`` custom op with a registered backward (what every fused
  op of the package is), forward and forward + backward per call: the fixed cost of such
  an op in a training step, shown beside the floors (not part of them: eager needs none).

A ceiling is the machine's best, so it uses the fastest repeat (``min_ms``), where the
cases report medians; the runner measures them at the start and again at the end of a
run and keeps the better (:func:`merge_best`).
"""
from __future__ import annotations

import torch

from .timing import Budget, measure


def copy_gbps(device: torch.device, nbytes: int | None = None) -> dict:
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    # Longer on the CPU: its fastest repeat only shows through on a busy machine.
    ms = 200 if device.type == "cuda" else 600
    res = measure(lambda: dst.copy_(src), device, Budget(warmup_ms=50, measure_ms=ms,
                                                       min_reps=5, max_reps=50))
    del src, dst
    gbps = 2 * nbytes / (res["min_ms"] * 1e-3) / 1e9
    return {"gbps": gbps, "bytes": nbytes, "min_ms": res["min_ms"], "median_ms": res["median_ms"],
            "how": "dst.copy_(src), read + write counted"}


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> dict:
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = 300 if device.type == "cuda" else 1000
    res = measure(lambda: torch.mm(a, b, out=c), device, Budget(warmup_ms=50, measure_ms=ms,
                                                               min_reps=3, max_reps=50))
    del a, b, c
    tflops = 2.0 * n**3 / (res["min_ms"] * 1e-3) / 1e12
    return {"tflops": tflops, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "min_ms": res["min_ms"], "median_ms": res["median_ms"],
            "how": f"torch.mm {n}x{n}x{n}"}


def launch_ms(device: torch.device) -> dict:
    x = torch.zeros(1, device=device)
    res = measure(lambda: x.add_(1), device, Budget(warmup_ms=20, measure_ms=50,
                                                     min_reps=20, max_reps=200))
    return {"ms": res["min_ms"], "median_ms": res["median_ms"], "reps": res["reps"],
            "how": "x.add_(1) on one element, back-to-back calls, fastest repeat"}


_FLOOR_OP = None


def _floor_op():
    """A ``torch.library`` custom op with a registered backward around one elementwise
    kernel (``x * 2``): the machinery every fused op of the package goes through."""
    global _FLOOR_OP
    if _FLOOR_OP is None:
        @torch.library.custom_op("minc_bench::floor_op", mutates_args=())
        def floor_op(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @floor_op.register_fake
        def _(x):
            return torch.empty_like(x)

        def backward(ctx, grad):
            return grad * 2

        floor_op.register_autograd(backward)
        _FLOOR_OP = floor_op
    return _FLOOR_OP


def custom_op_ms(device: torch.device) -> dict:
    """Per call: one custom op forward, and forward + ``.sum().backward()`` through its
    registered autograd, on a 1024-element tensor (the fixed cost of one fused op in a
    training step before any arithmetic), timed like the cases, fastest repeat."""
    op = _floor_op()
    x = torch.zeros(1024, device=device, requires_grad=True)
    budget = Budget(warmup_ms=20, measure_ms=50, min_reps=20, max_reps=200)
    fwd = measure(lambda: op(x), device, budget)

    def fwd_bwd():
        x.grad = None
        op(x).sum().backward()

    both = measure(fwd_bwd, device, budget)
    return {"fwd_ms": fwd["min_ms"], "fwd_bwd_ms": both["min_ms"],
            "how": "torch.library.custom_op (x * 2) with register_autograd, 1024 values; "
                   "fwd, and fwd + .sum().backward(); fastest repeat"}


def measure_ceilings(device: torch.device, dtypes: list[torch.dtype]) -> dict:
    out = {"copy": copy_gbps(device), "matmul": {}, "launch": launch_ms(device),
           "custom_op": custom_op_ms(device)}
    for dt in dtypes:
        out["matmul"][str(dt).replace("torch.", "")] = matmul_tflops(device, dt)
    return out


def merge_best(first: dict, second: dict) -> dict:
    """Ceilings measured at the start and at the end of a run: keep the better of each
    (a busy or still-warming machine only ever makes a ceiling look lower); both kept."""
    out = {"copy": dict(first["copy"]), "matmul": {}}
    runs = [first["copy"]["gbps"], second["copy"]["gbps"]]
    if runs[1] > runs[0]:
        out["copy"] = dict(second["copy"])
    out["copy"]["runs_gbps"] = runs
    for dt, m in first["matmul"].items():
        other = second["matmul"].get(dt, m)
        best = other if other["tflops"] > m["tflops"] else m
        out["matmul"][dt] = dict(best, runs_tflops=[m["tflops"], other["tflops"]])
    if "custom_op" in first:
        pair = (first["custom_op"], second.get("custom_op", first["custom_op"]))
        out["custom_op"] = min(pair, key=lambda c: c["fwd_bwd_ms"])
    if "launch" in first:  # a floor: the lower of the two is the machine's best
        runs = [first["launch"]["ms"], second.get("launch", first["launch"])["ms"]]
        best = second["launch"] if runs[1] < runs[0] else first["launch"]
        out["launch"] = dict(best, runs_ms=runs)
    return out
