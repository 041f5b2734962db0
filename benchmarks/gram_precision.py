"""Precision of the spectral loss's bf16 Gram path: the products on Grams rounded to bf16
against the fp32 Grams they replaced, and against eager PyTorch, at benchmark shapes.

The Triton op's bf16 ``"gram"`` path (``ops.spectral._gram_grad``) forms the fp32 Grams
``G1 = Z1ᵀZ1``, ``G2 = Z2ᵀZ2``, takes the loss from them (``<G1, G2>_F`` by a fp32 dot) and
the gradients ``α(Z1 G2 - d∘Z2) + β Z2`` (and the mirror) from the Grams **rounded to
bf16**: one native dot per tile instead of three split ones.  This script measures what
that costs in accuracy, on the CPU, against a float64 oracle:

* ``eager-pairwise`` / ``eager-gram``: the eager reference in bf16 (autograd's gradients);
* ``fp32-G`` / ``bf16-G``: the op's arithmetic emulated in float64 from the same bf16
  inputs: the fp32-rounded Grams (the split dots' product is exact to fp32), or the Grams
  rounded to bf16, each gradient rounded once to bf16 at the end, as the op writes it;
* ``op``: the Triton op itself (``algorithm="gram"``) where ``--op-max`` allows (under
  ``TRITON_INTERPRET=1`` on the CPU it is slow), to tie the emulation to the kernels.

Inputs: three regimes of unit-scale rows (norm 0.9 < sqrt(μ), so clipping is the
identity): ``random`` (independent views), ``aligned`` (z2 = z1 + noise, as in training),
``collapsed`` (every row near one common vector: the off-diagonal term is as large as it
gets).  Errors are the max absolute error over all entries divided by the largest entry
of the oracle, for the loss and each gradient.

A second table (``--kxk-shapes``) does the same for the k×k paths of Barlow Twins and
VICReg with the Triton ops themselves (interpreted, so small shapes): the op as shipped,
the op with the rounding switched off (``rounds_operand`` patched to False: the fp32
operand as split pieces) and eager, on independent and aligned views.  Barlow Twins
rounds its ``Γ`` (eager autograd rounds ``∂L/∂C``); VICReg does not (its ``Γ`` carries the
variance hinge's derivative, which eager keeps in fp32), so its two op columns agree and
its rows check the op against eager.

Usage: ``python -m benchmarks.gram_precision --out DIR [--shapes BxK ...] [--op-max N]
[--kxk-shapes NxK ...]`` writes ``DIR/results.json`` and ``DIR/results.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_SHAPES = ("1024x256", "4099x130", "8192x128", "8192x512", "4096x2048")
REGIMES = ("random", "aligned", "collapsed")
MU = 1.0


def _inputs(torch, b, k, regime, seed):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, k, generator=gen, dtype=torch.float64)
    if regime == "collapsed":
        c = torch.randn(1, k, generator=gen, dtype=torch.float64)
        z1 = c + 0.3 * z1
        z2 = c + 0.3 * torch.randn(b, k, generator=gen, dtype=torch.float64)
    elif regime == "aligned":
        z2 = z1 + 0.3 * torch.randn(b, k, generator=gen, dtype=torch.float64)
    else:
        z2 = torch.randn(b, k, generator=gen, dtype=torch.float64)
    z1 = z1 / z1.norm(dim=1, keepdim=True) * 0.9
    z2 = z2 / z2.norm(dim=1, keepdim=True) * 0.9
    return z1.bfloat16(), z2.bfloat16()


def _autograd(torch, fn, z1, z2, g):
    a = z1.clone().requires_grad_()
    c = z2.clone().requires_grad_()
    loss = fn(a, c)
    ga, gc = torch.autograd.grad(loss * g, (a, c))
    return loss.detach().double(), ga.double(), gc.double()


def _emulate(torch, z1, z2, g, round_grams):
    """The op's bf16 gram path in float64 (no clipping: rows are inside the ball)."""
    b, _ = z1.shape
    x, y = z1.double(), z2.double()
    d = (x * y).sum(dim=1)
    inv, pos = 1.0 / (b * (b - 1) * MU), -2.0 / (b * MU)
    g1 = (x.T @ x).float().double()
    g2 = (y.T @ y).float().double()
    frob = (g1 * g2).sum()
    if round_grams:
        g1, g2 = g1.bfloat16().double(), g2.bfloat16().double()
    gx = 2 * inv * (x @ g2 - d[:, None] * y) + pos * y
    gy = 2 * inv * (y @ g1 - d[:, None] * x) + pos * x
    loss = pos * d.sum() + inv * (frob - (d * d).sum())
    return loss, (g * gx).bfloat16().double(), (g * gy).bfloat16().double()


def _rel_errors(got, want):
    return [float((a - w).abs().max() / w.abs().max()) for a, w in zip(got, want)]


def run(shapes, op_max, seed=0):
    import torch

    from minc_kernels import reference
    rows = []
    g = 0.8
    for shape in shapes:
        b, k = map(int, shape.split("x"))
        for regime in REGIMES:
            t0 = time.perf_counter()
            z1, z2 = _inputs(torch, b, k, regime, seed)
            def pairwise(a, c):
                return reference.spectral_loss(a, c, MU, True, "pairwise")

            want = _autograd(torch, pairwise, z1.double(), z2.double(), g)
            got = {
                "eager-pairwise": _autograd(torch, pairwise, z1, z2, g),
                "eager-gram": _autograd(
                    torch, lambda a, c: reference.spectral_loss(a, c, MU, True, "gram"), z1, z2, g),
                "fp32-G": _emulate(torch, z1, z2, g, False),
                "bf16-G": _emulate(torch, z1, z2, g, True),
            }
            if b * k <= op_max:
                from minc_kernels.ops import spectral as ops
                got["op"] = _autograd(
                    torch, lambda a, c: ops.spectral_loss(a, c, MU, True, "gram"), z1, z2, g)
            row = {"B": b, "k": k, "regime": regime, "seconds": None,
                   "errors": {name: dict(zip(("loss", "dz1", "dz2"), _rel_errors(v, want)))
                              for name, v in got.items()}}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"{b}x{k} {regime}: " + "  ".join(
                f"{n} {e['dz1']:.2e}/{e['dz2']:.2e}" for n, e in row["errors"].items()),
                file=sys.stderr, flush=True)
    return rows


def run_kxk(shapes, seed=0):
    """Barlow Twins and VICReg, ``algorithm="gram"``: the op with and without the rounded
    k×k operand, and eager, against float64."""
    import torch

    import minc_kernels.functional as Fn
    from minc_kernels import reference
    from minc_kernels.ops import barlow_twins as ob
    from minc_kernels.ops import gram as og
    from minc_kernels.ops import vicreg as ov
    losses = {
        "barlow_twins": (lambda a, c: Fn.barlow_twins_loss(a, c, algorithm="gram",
                                                           backend="triton"),
                         lambda a, c: reference.barlow_twins_loss(a, c, 5e-3, "gram")),
        "vicreg": (lambda a, c: Fn.vicreg_loss(a, c, algorithm="gram", backend="triton"),
                   lambda a, c: reference.vicreg_loss(a, c, algorithm="gram")),
    }
    rows = []
    g = 0.8
    for loss, (op, ref) in losses.items():
        for shape in shapes:
            n, k = map(int, shape.split("x"))
            for regime in ("random", "aligned"):
                gen = torch.Generator().manual_seed(seed)
                za = torch.randn(n, k, generator=gen, dtype=torch.float64)
                noise = torch.randn(n, k, generator=gen, dtype=torch.float64)
                zb = za + 0.3 * noise if regime == "aligned" else noise
                za, zb = za.bfloat16(), zb.bfloat16()
                want = _autograd(torch, ref, za.double(), zb.double(), g)
                got = {"eager": _autograd(torch, ref, za, zb, g),
                       "op": _autograd(torch, op, za, zb, g)}
                saved = [(m, m.rounds_operand) for m in (og, ob, ov)
                         if hasattr(m, "rounds_operand")]
                try:
                    for m, _ in saved:
                        m.rounds_operand = lambda dtype: False
                    got["op, fp32 operand"] = _autograd(torch, op, za, zb, g)
                finally:
                    for m, f in saved:
                        m.rounds_operand = f
                rows.append({"loss": loss, "N": n, "k": k, "regime": regime,
                             "errors": {name: dict(zip(("loss", "dz1", "dz2"),
                                                       _rel_errors(v, want)))
                                        for name, v in got.items()}})
                print(f"{loss} {n}x{k} {regime}: " + "  ".join(
                    f"{nm} {e['dz1']:.2e}/{e['dz2']:.2e}" for nm, e in rows[-1]["errors"].items()),
                    file=sys.stderr, flush=True)
    return rows


def kxk_markdown(rows):
    if not rows:
        return ""
    names = list(rows[0]["errors"])
    lines = ["", "## Barlow Twins and VICReg, k×k path (the Triton ops, interpreted)", "",
             "`op`: as shipped (Barlow Twins rounds Γ for bf16 rows; VICReg keeps its fp32 Γ, "
             "so its two op columns agree); `op, fp32 operand`: with the rounding switched off.",
             ""]
    header = ["loss", "N", "k", "regime"] + [f"{n} dz" for n in names] + \
        ["op dz / eager dz", "op dz / fp32-operand dz"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in rows:
        dz = {n: max(v["dz1"], v["dz2"]) for n, v in r["errors"].items()}
        cells = [r["loss"], str(r["N"]), str(r["k"]), r["regime"]]
        cells += [f"{dz[n]:.2e}" for n in names]
        cells += [f"{dz['op'] / dz['eager']:.2f}", f"{dz['op'] / dz['op, fp32 operand']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_markdown(meta, rows):
    names = list(rows[0]["errors"]) if rows else []
    for r in rows:
        names += [n for n in r["errors"] if n not in names]
    lines = ["# Precision of the bf16 spectral Gram path (CPU, float64 oracle)", "",
             f"- {meta['date']}, git commit `{meta['commit']}`, torch {meta['torch']}; "
             f"command: `{meta['command']}`",
             "- Max absolute error over all entries / largest oracle entry; `dz` is the worse "
             "of the two views' gradients. `bf16-G`: the op's products on Grams rounded to "
             "bf16 (emulated), `fp32-G`: on the fp32 Grams it used before, `op`: the Triton "
             "op under the interpreter (small shapes only).", ""]
    header = ["B", "k", "regime"] + [f"{n} loss" for n in names] + [f"{n} dz" for n in names] \
        + ["bf16-G dz / eager-pairwise dz", "bf16-G dz / fp32-G dz"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in rows:
        e = r["errors"]
        dz = {n: max(v["dz1"], v["dz2"]) for n, v in e.items()}
        cells = [str(r["B"]), str(r["k"]), r["regime"]]
        cells += [f"{e[n]['loss']:.1e}" if n in e else "" for n in names]
        cells += [f"{dz[n]:.2e}" if n in dz else "" for n in names]
        cells += [f"{dz['bf16-G'] / dz['eager-pairwise']:.2f}",
                  f"{dz['bf16-G'] / dz['fp32-G']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--op-max", type=int, default=0,
                        help="run the Triton op too where B*k <= this (interpreted: slow)")
    parser.add_argument("--kxk-shapes", nargs="*", default=[],
                        help="NxK shapes for the Barlow Twins / VICReg k×k table (interpreted)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    rows = run(args.shapes, args.op_max)
    kxk = run_kxk(args.kxk_shapes)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": os.environ.get("MINC_KERNELS_GIT_COMMIT", "unknown"),
            "torch": torch.__version__,
            "command": "python -m benchmarks.gram_precision " + " ".join(argv or sys.argv[1:])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "kxk_rows": kxk}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(to_markdown(meta, rows) + kxk_markdown(kxk))


if __name__ == "__main__":
    main()
