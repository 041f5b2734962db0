"""A model of the HBM traffic the Gram layer's tile order causes (a prediction, no GPU).

The Gram-layer kernels run one program per output tile.  ``rowmat_kernel`` (``X Gᵀ``) reads
a row block of ``X`` and a column block of ``G`` over the whole k; ``moment_partial_kernel``
(``Xᵀ X``) and ``cross_gram_kernel`` (``Xᵀ Y``) read two column blocks of the rows over a row
slice.  The GPU starts the programs in launch order, about ``132 × CTAs per SM`` at a time,
and those in flight stream their blocks along k (or the rows) at about the same pace: a
block two of them share is read from HBM once, if it is still in L2 when the second needs
it.  With the row blocks the fastest grid axis, a wave of 264 programs at B = k = 8192
touches all 128 row blocks of ``X`` (128 MiB, more than the 50 MB L2) and two columns of
``G``: ``X`` streams from HBM once per wave, 62 times in all.  Ordering the programs by
groups of ``GROUP`` row blocks (the grouped order of Triton's matmul tutorial) makes a
wave's footprint about ``GROUP`` row blocks and ``W / GROUP`` column blocks.

The model: programs in launch order (the kernel's order, ``tile_order``), cut into waves of
``W`` live programs; each wave touches its distinct blocks once; an LRU cache of ``l2``
bytes at block granularity decides which of them come from HBM.  It counts operand bytes
only (the epilogue's tiles and the outputs are the same in every order).  What it leaves
out: L2's two partitions, programs that drift out of step, prefetch.  Read it as the size
of the effect, not as a timing.

``python -m benchmarks.tile_order [--out DIR]`` prints (and writes) the table for the heavy
bf16 shapes of the benchmark grid.
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

SMS = 132
L2_BYTES = 50 * 2**20  # H100 / H200 (GH100): 50 MB
HBM_BW = 3.35e12  # H100 SXM, bytes/s (H200: 4.8e12)
MATMUL_FLOPS = 7.17e14  # the bf16 torch.mm ceiling the H200 visit measured


def tile_order(n_m: int, n_n: int, group: int):
    """``(m, n)`` tiles in the order the kernels run them: launch order over a grid whose
    fastest axis is ``m`` (``group = 0``, or ``group >= n_m``), or by groups of ``group``
    m-blocks: the map of :func:`minc_kernels.kernels.gram.grouped_tile`."""
    if group <= 0:
        group = n_m
    per_group = group * n_n
    for lin in range(n_m * n_n):
        g, r = divmod(lin, per_group)
        first = g * group
        size = min(n_m - first, group)
        yield first + r % size, r // size


def hbm_bytes(blocks_per_program, wave: int, l2: int = L2_BYTES) -> int:
    """HBM bytes of operand reads: ``blocks_per_program`` yields, per live program in launch
    order, its ``[(block key, bytes), ...]``; waves of ``wave`` programs, LRU of ``l2``."""
    cache: OrderedDict = OrderedDict()
    used = total = 0
    batch: dict = {}

    def flush():
        nonlocal used, total
        for key, size in batch.items():
            if key in cache:
                cache.move_to_end(key)
                continue
            total += size
            cache[key] = size
            used += size
            while used > l2:
                _, s = cache.popitem(last=False)
                used -= s
        batch.clear()

    count = 0
    for blocks in blocks_per_program:
        for key, size in blocks:
            batch[key] = size
        count += 1
        if count % wave == 0:
            flush()
    flush()
    return total


def rowmat_programs(b, k, bm, bn, x_bytes, g_bytes, group):
    """``rowmat_kernel``: program (m, n) reads X's row block m and G's column block n."""
    n_m, n_n = -(-b // bm), -(-k // bn)
    for m, n in tile_order(n_m, n_n, group):
        yield [(("x", m), bm * k * x_bytes), (("g", n), bn * k * g_bytes)]


def moment_programs(b, k, bk, x_bytes, group, symmetric=True):
    """``moment_partial_kernel`` (``symmetric``: only tiles a <= b run) or
    ``cross_gram_kernel``, one row slice: program (a, c) reads column blocks a and c."""
    n = -(-k // bk)
    for a, c in tile_order(n, n, group):
        if symmetric and a > c:
            continue
        yield [(("x", a), b * bk * x_bytes), (("y" if not symmetric else "x", c), b * bk * x_bytes)]


# (kernel, B, k, tile sizes, CTAs per SM from the static sm_90 table, bf16 operands)
CASES = [
    ("rowmat (64×64, MODE 4)", dict(kind="rowmat", bm=64, bn=64, x=2, g=2, occ=2)),
    ("rowmat wide (64×128, MODE 4)", dict(kind="rowmat", bm=64, bn=128, x=2, g=2, occ=2)),
    ("rowmat (64×64, MODE 3 pieces)", dict(kind="rowmat", bm=64, bn=64, x=2, g=6, occ=2)),
    ("moment_partial (64×64)", dict(kind="moment", bk=64, x=2, occ=4)),
    ("cross_gram (64×64)", dict(kind="cross", bk=64, x=2, occ=4)),
]
SHAPES = [(4096, 2048), (8192, 2048), (2048, 8192), (4096, 8192), (8192, 8192)]


def model(kind, b, k, group, occ, l2=L2_BYTES, **t):
    wave = SMS * occ
    if kind == "rowmat":
        progs = rowmat_programs(b, k, t["bm"], t["bn"], t["x"], t["g"], group)
        flops = 2 * b * k * k * (3 if t["g"] == 6 else 1)
        compulsory = b * k * t["x"] + k * k * t["g"]
    else:
        progs = moment_programs(b, k, t["bk"], t["x"], group, symmetric=kind == "moment")
        flops = (1 if kind == "moment" else 2) * b * k * k
        compulsory = (1 if kind == "moment" else 2) * b * k * t["x"]
    return hbm_bytes(progs, wave, l2), flops, compulsory


def table(group: int = 16, l2: int = L2_BYTES):
    rows = []
    for name, spec in CASES:
        spec = dict(spec)
        kind, occ = spec.pop("kind"), spec.pop("occ")
        for b, k in SHAPES:
            lin, flops, comp = model(kind, b, k, 0, occ, l2, **spec)
            grp, _, _ = model(kind, b, k, group, occ, l2, **spec)
            rows.append(dict(kernel=name, B=b, k=k, group=group, compulsory_mb=comp / 2**20,
                             linear_mb=lin / 2**20, grouped_mb=grp / 2**20,
                             flop_us=flops / MATMUL_FLOPS * 1e6,
                             linear_hbm_us=lin / HBM_BW * 1e6, grouped_hbm_us=grp / HBM_BW * 1e6))
    return rows


def markdown(rows) -> str:
    out = ["| kernel | B | k | compulsory MiB | launch order MiB | grouped MiB | flop floor µs "
           "| HBM µs launch → grouped | floor µs launch → grouped |",
           "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lin = max(r["flop_us"], r["linear_hbm_us"])
        grp = max(r["flop_us"], r["grouped_hbm_us"])
        out.append(f"| {r['kernel']} | {r['B']} | {r['k']} | {r['compulsory_mb']:.0f} "
                   f"| {r['linear_mb']:.0f} | {r['grouped_mb']:.0f} | {r['flop_us']:.0f} "
                   f"| {r['linear_hbm_us']:.0f} → {r['grouped_hbm_us']:.0f} "
                   f"| {lin:.0f} → {grp:.0f} ({lin / grp:.2f}×) |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--l2-mib", type=float, default=L2_BYTES / 2**20,
                    help="the L2 the model assumes (default 50: GH100)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write table.md and table.json here (table-l2-<MiB>.* off the default)")
    args = ap.parse_args(argv)
    rows = table(args.group, int(args.l2_mib * 2**20))
    text = markdown(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "table" if args.l2_mib * 2**20 == L2_BYTES else f"table-l2-{args.l2_mib:g}"
        (args.out / f"{stem}.md").write_text(text + "\n")
        (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
