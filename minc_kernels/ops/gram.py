"""The shared Gram layer (launcher side): ``Xᵀ X``, ``<G, Xᵀ X>_F`` and the fused ``X Gᵀ``;
``Xᵀ Y`` and the per-column standardisation/centring of two views (Barlow Twins, VICReg).

MINC is :func:`rowmat` + :func:`gram`; the spectral feature-Gram path uses all three.
A new loss whose gradient is ``α·X Gᵀ + (β + γ·d)∘Y`` for a fp32 k×k ``G`` calls these and
adds no kernel (see docs/kernels.md).  Tile sizes: :mod:`minc_kernels.ops.configs`.
Deterministic: per-program fp32 partials summed by ``torch.sum`` in a fixed order.

Two implementations of the GEMM-shaped launchers (:func:`gram`, :func:`gram_dot`,
:func:`cross_gram`, :func:`rowmat`), chosen by ``MINC_KERNELS_GRAM`` (read per call):

* ``"auto"`` (default): per launcher and shape, what the measured table of the GPU family
  says (:mod:`minc_kernels.ops.tables`, decisions ``gram.<launcher>/<dtype>``, written by
  ``python -m benchmarks.calibrate``); ``"triton"`` where no table answers;
* ``"triton"``: the fused kernels of :mod:`minc_kernels.kernels.gram`;
* ``"triton_wide"``: the Triton kernels with wider tiles where a launcher has them
  (``rowmat`` on a ``G`` rounded to the rows' half dtype:
  :func:`~minc_kernels.ops.configs.rowmat_config`'s ``wide``), else as ``"triton"``.  A
  candidate for Hopper, not a default: only a measured table chooses it under ``"auto"``;
* ``"cublas"``: a candidate for Hopper: ``torch.mm`` for the products — half inputs
  with fp32 output (``out_dtype``), a fp32 ``G`` against half rows as three half GEMMs of
  its hi/mid/lo split (bf16; fp16 rows take one fp32 GEMM, exact but off the tensor cores),
  fp32 as fp32 GEMMs (cuBLAS honours the global TF32 switch: leave it off for exact fp32) —
  and torch elementwise ops for the epilogues.  Same math and precision class as the
  kernels; not bit-identical to them.
"""
from __future__ import annotations

import os

import torch

from ..kernels.gram import (colstats_backward_kernel, colstats_backward_partial_kernel,
                            colstats_kernel, colstats_partial_kernel, colstats_terms_kernel,
                            combine_kernel, cross_gram_kernel, gram_finish_kernel,
                            moment_partial_kernel, rowmat_kernel, split_bf16x3_kernel)
from . import configs, tables
from ._common import (DEVICE_BW, cdiv, device_guard, interpreting, is_fp32, num_sms,
                      next_pow2, rhs_f32_mode, upcast_bf16_dot)

__all__ = ["rowmat", "rowmat_pair", "rowmat_value", "combine", "gram", "gram_pair", "gram_dot",
           "gram_slices", "gram_finish", "FINISH_DIAG", "cross_gram", "cross_gram_partials",
           "col_stats", "col_stats_backward", "col_terms",
           "gram_backend", "split_bf16x3", "rounds_operand", "rounded", "GRAM_BACKENDS",
           "GRAM_IMPLS", "WIDE_LAUNCHERS", "gram_impls", "tile_group", "TILE_ORDERS"]

GRAM_BACKENDS = ("auto", "triton", "triton_wide", "cublas")
GRAM_ENV = "MINC_KERNELS_GRAM"
GRAM_IMPLS = ("triton", "cublas")  # what "auto" chooses between
WIDE_LAUNCHERS = ("rowmat_rounded",)  # the launchers with a "triton_wide" tiling


TILE_ORDER_ENV = "MINC_KERNELS_TILE_ORDER"
TILE_ORDERS = ("grouped", "launch")


def tile_group(dtype: torch.dtype, blocks: int, nbytes: int) -> int:
    """The ``GROUP`` of the Gram kernels' tile order for rows of ``dtype`` on a grid of
    ``blocks`` blocks along its first axis, whose programs in flight would, in the grid's
    own order, read ``nbytes`` of operand (``MINC_KERNELS_TILE_ORDER``, read per call).

    ``"grouped"`` (default): :data:`~minc_kernels.ops.configs.TILE_GROUP` for half rows
    where the grid has more blocks than a group and ``nbytes`` exceeds
    :data:`~minc_kernels.ops.configs.TILE_GROUP_MIN_BYTES` (half the L2: below it L2 holds
    what the programs share in either order); else 0, the grid's own order, without the
    map's integer work (on sm_90 it moved registers by -72 to +58 and cost a CTA per SM
    in some launches, mostly unaligned ones).  fp32 rows, whose strict fp32 dots are bound
    by FMA throughput rather than memory, keep the grid's order (there the map cost a 4 B
    spill at B = 1023, k = 1001).  ``"launch"``: 0 always, for an A/B on a GPU.  No value
    depends on it."""
    value = os.environ.get(TILE_ORDER_ENV, "grouped") or "grouped"
    if value == "grouped":
        if interpreting():
            group, min_bytes = configs.TILE_GROUP_INTERPRETER, 0
        else:
            group, min_bytes = configs.TILE_GROUP, configs.TILE_GROUP_MIN_BYTES
        return group if blocks > group and nbytes > min_bytes and not is_fp32(dtype) else 0
    if value == "launch":
        return 0
    raise ValueError(f"environment variable {TILE_ORDER_ENV} must be one of "
                     f"{', '.join(map(repr, TILE_ORDERS))}, got {value!r}")


def gram_impls(launcher: str) -> tuple[str, ...]:
    """The implementations a table chooses between for ``launcher``."""
    return ("triton", "triton_wide", "cublas") if launcher in WIDE_LAUNCHERS else GRAM_IMPLS


def gram_backend(launcher: str, x: torch.Tensor) -> str:
    """``"triton"``, ``"triton_wide"`` (only for :data:`WIDE_LAUNCHERS`) or ``"cublas"`` for
    one launch of ``launcher`` on rows ``x``: ``MINC_KERNELS_GRAM`` (validated), and under
    ``"auto"`` (the default) the measured table of ``x``'s GPU family, else ``"triton"``."""
    value = os.environ.get(GRAM_ENV, "auto") or "auto"
    if value not in GRAM_BACKENDS:
        raise ValueError(f"environment variable {GRAM_ENV} must be one of "
                         f"{', '.join(map(repr, GRAM_BACKENDS))}, got {value!r}")
    if value == "triton_wide" and launcher not in WIDE_LAUNCHERS:
        return "triton"
    if value != "auto":
        return value
    rows, cols = x.shape
    return tables.choose(tables.gram_decision(launcher, x.dtype), x.device, rows, cols,
                         gram_impls(launcher)) or "triton"


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 from operands of one storage dtype, fp32 accumulation."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # exact products, fp32 sums: what the GPU GEMM computes


def _mm_rhs_f32(x: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """``x @ g_t`` for storage-dtype rows ``x`` and a fp32 ``g_t``, fp32 out: bf16 rows as
    three bf16 GEMMs on the hi/mid/lo split of ``g_t`` (~24 mantissa bits, as the kernels'
    MODE 1); fp16 and fp32 rows as one fp32 GEMM.  A ``g_t`` in ``x``'s half dtype: one
    half GEMM (the kernels' MODE 4)."""
    if g_t.dtype == x.dtype:
        return _mm_f32(x, g_t)
    if x.dtype != torch.bfloat16:
        return x.float() @ g_t
    hi = g_t.to(torch.bfloat16)
    rest = g_t - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return _mm_f32(x, hi).add_(_mm_f32(x, mid)).add_(_mm_f32(x, lo))


def _rowmat_mm(x, g, y, d, alpha, beta, gamma, gha, need_grad):
    q = _mm_rhs_f32(x, (torch.tril(g) if gha else g).T)
    xf, yf = x.float(), y.float()
    # the value uses M itself even with gha (the GHA ordering changes the gradient only)
    quad = (xf * (q if not gha else _mm_rhs_f32(x, g.T))).sum()
    cross = (xf * yf).sum()
    if not need_grad:
        return quad, cross, None
    coef = beta if d is None else (beta + gamma * d.float()).unsqueeze(1)
    return quad, cross, q.mul_(alpha).add_(coef * yf)


def _check_out(x: torch.Tensor, out: torch.Tensor | None, need_grad: bool) -> None:
    if out is not None and (not need_grad or out.shape != x.shape or out.dtype != torch.float32
                            or out.device != x.device):
        raise ValueError(f"out must be a float32 tensor of shape {tuple(x.shape)} on {x.device} "
                         f"(and need_grad True), got {out.dtype} {tuple(out.shape)} on {out.device}")


def rowmat(x: torch.Tensor, g: torch.Tensor, y: torch.Tensor, d: torch.Tensor | None,
           alpha: float, beta: float, gamma: float, gha: bool, need_grad: bool,
           out: torch.Tensor | None = None):
    """``Q = X Gᵀ`` fused: returns ``(Σ x∘q, Σ x∘y, out)`` with ``out = α·Q' + (β + γ·d)·y``
    (fp32 (B, k), ``Q'`` = ``X LT(G)ᵀ`` with ``gha``) or ``None`` without ``need_grad``.

    ``g``: fp32 (k, k), or (half ``x`` only) already rounded to ``x``'s dtype, which then
    takes one native dot per tile instead of the fp32 split's two or three.

    ``out``: an fp32 (B, k) destination of any strides (e.g. the transpose of a contiguous
    (k, B) buffer, so that the N×N paths of Barlow Twins/VICReg get their gradient in the
    inputs' layout without a copy); allocated contiguous when None."""
    _check_out(x, out, need_grad)
    backend = gram_backend(_rowmat_launcher(x, g), x)
    if backend == "cublas":
        quad, cross, res = _rowmat_mm(x, g, y, d, alpha, beta, gamma, bool(gha and need_grad),
                                      need_grad)
        return quad, cross, (res if out is None or res is None else out.copy_(res))
    return _rowmat_triton([(x, g, y, d, out)], alpha, beta, gamma, gha, need_grad,
                          wide=backend == "triton_wide")[0]


def rowmat_value(x: torch.Tensor, g: torch.Tensor, y: torch.Tensor, alpha: float, beta: float,
                 gha: bool, need_grad: bool, w_quad: float, w_cross: float):
    """:func:`rowmat` (no ``d``, ``γ = 0``) reduced to one value: ``(w_quad·Σ x∘q +
    w_cross·Σ x∘y, out)``, a fp32 0-dim tensor and the gradient (or ``None``).  The Triton
    path reads rowmat's per-program partials in one :func:`combine` launch (MINC's loss:
    four torch ops on the partials before, a launch each on a GPU)."""
    backend = gram_backend(_rowmat_launcher(x, g), x)
    if backend == "cublas":
        quad, cross, res = rowmat(x, g, y, None, alpha, beta, 0.0, gha, need_grad)
        return quad * w_quad + cross * w_cross, res
    ((part, res),) = _rowmat_triton([(x, g, y, None, None)], alpha, beta, 0.0, gha, need_grad,
                                    wide=backend == "triton_wide", raw=True)
    return combine(part[:, 0], w_quad, part[:, 1:], w_cross), res


def combine(a: torch.Tensor, wa: float, p: torch.Tensor, wp: float,
            wa2: float | None = None) -> torch.Tensor:
    """``wa·Σ a + wp·(Σ p + wa2·Σ a²)`` (the ``a²`` term only with ``wa2``) as a fp32 0-dim
    tensor, in one launch of ``combine_kernel``: ``a`` a 1-dim fp32 tensor (any stride),
    ``p`` a fp32 tensor of 0-2 dims whose last dimension is contiguous."""
    rows, cols = (1, 1) if p.dim() == 0 else (1, p.shape[0]) if p.dim() == 1 else p.shape
    if p.dim() > 0 and p.shape[-1] > 1 and p.stride(-1) != 1:
        raise ValueError(f"p's last dimension must be contiguous, got strides {p.stride()}")
    out = torch.empty((), dtype=torch.float32, device=a.device)
    with device_guard(a):
        combine_kernel[(1,)](
            a, a.shape[0], a.stride(0), p, rows, cols, p.stride(0) if p.dim() == 2 else cols,
            out, float(wa), 0.0 if wa2 is None else float(wa2), float(wp), A2=wa2 is not None,
            BLOCK=configs.COMBINE_BLOCK)
    return out


def _rowmat_launcher(x: torch.Tensor, g: torch.Tensor) -> str:
    """The table's name for a rowmat call: ``"rowmat_rounded"`` where ``G`` is already in
    the rows' half dtype (one native dot per tile against one half GEMM), else ``"rowmat"``
    (a fp32 ``G``: the split's dots against three GEMMs).  Two decisions: the race differs."""
    return "rowmat_rounded" if g.dtype == x.dtype and not is_fp32(x.dtype) else "rowmat"


def _same_layout(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.device == b.device)


def rowmat_pair(first: tuple, second: tuple, alpha: float, beta: float, gamma: float,
                gha: bool, need_grad: bool, raw: bool = False):
    """:func:`rowmat` of two views with the same scalars: ``first`` and ``second`` are each
    ``(x, g, y, d, out)``; returns ``[(Σ x∘q, Σ x∘y, out)]`` per view.  One launch (the
    kernel's ``VIEWS = 2``: both views' tiles in one grid, the same bits as two) where the
    Triton kernels run and each operand has its counterpart's layout; else two calls.
    (``G`` with ``Gᵀ``: a caller copies them into one layout, as :func:`rounded` does.
    Pairing them in the kernel itself needs its body compiled once per view, to keep a
    stride of 1 a compile-time constant: on sm_90 that raised registers by up to 94 and
    cost occupancy, so it is not done.)

    ``raw``: ``(partials, [out, out])`` instead, the sums unsummed for :func:`combine` (a
    loss from them in one launch): a contiguous (2, programs, 2) fp32 tensor of the two
    views' per-program ``[Σ x∘q, Σ x∘y]`` (two Triton launches: their partials joined by one
    op; two cuBLAS calls: their sums, (2, 1, 2))."""
    x = first[0]
    for t in (first, second):
        _check_out(t[0], t[4], need_grad)
    backend = gram_backend(_rowmat_launcher(x, first[1]), x)
    if backend != "cublas" and all(_same_layout(a, b) for a, b in zip(first, second)):
        got = _rowmat_triton([first, second], alpha, beta, gamma, gha, need_grad,
                             wide=backend == "triton_wide", raw=raw)
        return (got[0][0].view(2, -1, 2), [o for _, o in got]) if raw else got
    if raw and backend != "cublas":  # two launches, their partials joined by one op
        got = [_rowmat_triton([t], alpha, beta, gamma, gha, need_grad,
                              wide=backend == "triton_wide", raw=True)[0] for t in (first, second)]
        return torch.cat([p for p, _ in got]).view(2, -1, 2), [o for _, o in got]
    got = [rowmat(*t[:4], alpha, beta, gamma, gha, need_grad, out=t[4]) for t in (first, second)]
    if raw:
        return torch.stack([torch.stack(g[:2]) for g in got]).view(2, 1, 2), [g[2] for g in got]
    return got


# The second view's pointers of a one-view launch: None (a constexpr the kernel never reads;
# cheaper for Triton's launcher to bind than five more tensors).
_NO_VIEW = (None,) * 5


ROWMAT_SPLIT_ENV = "MINC_KERNELS_ROWMAT_SPLIT"
ROWMAT_SPLIT_CHOICES = ("auto", "always", "never")


def _presplit(b: int, k: int) -> bool:
    """Whether a bf16 rowmat splits ``G`` beforehand: ``MINC_KERNELS_ROWMAT_SPLIT``
    (``auto`` by :func:`~minc_kernels.ops.configs.rowmat_presplit`, ``always``, ``never``)."""
    value = os.environ.get(ROWMAT_SPLIT_ENV, "auto") or "auto"
    if value not in ROWMAT_SPLIT_CHOICES:
        raise ValueError(f"environment variable {ROWMAT_SPLIT_ENV} must be one of "
                         f"{', '.join(map(repr, ROWMAT_SPLIT_CHOICES))}, got {value!r}")
    return value == "always" or (value == "auto" and configs.rowmat_presplit(b, k))


def _takes_pieces(x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether rowmat of bf16 rows ``x`` against the fp32 ``g`` runs on ``g``'s pieces split
    beforehand (MODE 3, by :func:`_presplit`)."""
    return g.dtype == torch.float32 and rhs_f32_mode(x.dtype) == 1 and _presplit(*x.shape)


def rounds_operand(dtype: torch.dtype) -> bool:
    """Whether rows of ``dtype`` multiply by a k×k (or N×N) fp32 operand rounded to their
    dtype (rowmat's MODE 4, one native dot per tile) where eager autograd rounds it too: the
    gradient products of the spectral Gram path and of Barlow Twins' k×k path (not VICReg's,
    whose Γ carries the variance hinge's derivative, which eager keeps in fp32).  bf16
    only: a fp16 copy of a Gram could overflow (entries reach B·μ), and fp32 stays strict
    fp32.  The losses' values keep the fp32 operands."""
    return dtype == torch.bfloat16


def rounded(g: torch.Tensor, g2: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``g`` (and ``g2``) rounded to ``dtype``, contiguous: (k, k), or (2, k, k) holding both
    in one layout (``rowmat_pair`` then takes them in one launch, e.g. ``Γ`` with ``Γᵀ``).
    One torch op per operand (a (2, k, k) ``g`` with ``g2=None``: one op for both)."""
    if g2 is None:
        return g.to(dtype, memory_format=torch.contiguous_format)
    out = torch.empty((2,) + tuple(g.shape), dtype=dtype, device=g.device)
    out[0].copy_(g)
    out[1].copy_(g2)
    return out


def split_bf16x3(g: torch.Tensor) -> torch.Tensor:
    """The hi, mid and lo bf16 pieces of the fp32 (k, k) ``g`` (any strides), as one
    contiguous (3, k, k) bf16 tensor (``kernels.gram.split_bf16x3_kernel``)."""
    k = g.shape[0]
    out = torch.empty((3, k, k), dtype=torch.bfloat16, device=g.device)
    with device_guard(g):
        split_bf16x3_kernel[(cdiv(k * k, configs.SPLIT_BLOCK),)](
            g, out, k, g.stride(0), g.stride(1), BLOCK=configs.SPLIT_BLOCK, num_warps=4)
    return out


def _rowmat_triton(views: list[tuple], alpha, beta, gamma, gha, need_grad,
                   wide: bool = False, raw: bool = False) -> list[tuple]:
    """One ``rowmat_kernel`` launch over one or two views ``(x, g, y, d, out)`` of one
    layout (the second view's operands take the first's strides).  bf16 rows against a
    large fp32 ``G`` take its bf16 pieces, split beforehand into a contiguous buffer
    (MODE 3, the same bits as MODE 1).  A half ``G`` (rounded by the caller) takes one
    native dot (MODE 4), with ``wide`` on :func:`~minc_kernels.ops.configs.rowmat_config`'s
    wide tiles.  ``raw``: ``[(partials, out)]`` per view, the one (views · programs, 2)
    fp32 buffer of the per-program ``Σ x∘q`` and ``Σ x∘y`` unsummed (the same tensor for
    both views)."""
    x, g, y, d, out = views[0]
    b, k = x.shape
    n = len(views)
    mode = rhs_f32_mode(x.dtype)
    if mode and g.dtype == x.dtype:
        mode = 4  # a half G, rounded by the caller: one native dot
    elif _takes_pieces(x, g):
        mode = 3
        views = [(vx, split_bf16x3(vg), vy, vd, vout) for vx, vg, vy, vd, vout in views]
        g = views[0][1]
    cfg = configs.rowmat_config(k, x.dtype, gha=bool(gha and need_grad), b=b,
                                wide=wide and mode == 4)
    grid = (cdiv(b, cfg["BLOCK_M"]), cdiv(k, cfg["BLOCK_N"]), n)
    part = torch.empty(n * grid[0] * grid[1], 2, dtype=torch.float32, device=x.device)
    ops = []
    for vx, vg, vy, vd, vout in views:
        if vout is None:
            vout = torch.empty((b, k) if need_grad else (1, 1), dtype=torch.float32,
                               device=x.device)
        ops.append((vx, vg, vy, vd if vd is not None else part, vout))
    out = ops[0][4]
    with device_guard(x):
        rowmat_kernel[grid](
            *ops[0], part, *(ops[1] if n == 2 else _NO_VIEW), b, k,
            x.stride(0), x.stride(1), g.stride(-2), g.stride(-1), y.stride(0), y.stride(1),
            out.stride(0), out.stride(1),
            float(alpha), float(beta), float(gamma),
            NEED_GRAD=bool(need_grad), GHA=bool(gha), HAS_D=d is not None,
            MODE=mode, UPCAST=upcast_bf16_dot(x.dtype), VIEWS=n,
            GROUP=tile_group(x.dtype, grid[0], b * k * x.element_size()), **cfg,
        )
    if raw:
        return [(part, ops[v][4] if need_grad else None) for v in range(n)]
    # the sums as views by one unbind (host time: four indexings cost twice as much)
    if n == 1:
        quad, cross = part.sum(dim=0).unbind()
        return [(quad, cross, out if need_grad else None)]
    sums = part.view(n, -1, 2).sum(dim=1).view(-1).unbind()
    return [(sums[2 * v], sums[2 * v + 1], ops[v][4] if need_grad else None) for v in range(n)]


def _row_split(b: int, block_b: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """``(slices, rows per slice)`` of a k×k-tile grid with ``tiles`` tiles: enough row
    slices to fill the device (about two programs per SM); the slices' partials are summed
    afterwards in a fixed order."""
    nb = cdiv(b, block_b)
    split = max(1, min(nb, cdiv(2 * num_sms(device), tiles)))
    rows_per_split = cdiv(nb, split) * block_b
    return cdiv(b, rows_per_split), rows_per_split


def _gram_launch(x: torch.Tensor, other: torch.Tensor | None, x2: torch.Tensor | None = None):
    """``moment_partial_kernel`` on ``x`` (and ``x2``, same layout, in the same launch):
    the per-slice partials, (S, k, k) fp32, or (2, S, k, k) with ``x2`` (one buffer, so one
    torch op sums both views' slices), and the slice count S (the same with one view or
    two, so a pair gives the bits of two launches).  With ``other``: the flat per-tile
    partials of ``<other, Xᵀ X>_F``."""
    b, k = x.shape
    cfg = configs.gram_config(k, x.dtype)
    nk = cdiv(k, cfg["BLOCK_K"])
    split, rows_per_split = _row_split(b, cfg["BLOCK_B"], nk * (nk + 1) // 2, x.device)
    views = 1 if x2 is None else 2
    if other is not None:
        buf = out = torch.empty(split * nk * nk, dtype=torch.float32, device=x.device)
        out2 = None
    elif views == 1:
        buf = out = torch.empty(split, k, k, dtype=torch.float32, device=x.device)
        out2 = None
    else:
        buf = torch.empty(2, split, k, k, dtype=torch.float32, device=x.device)
        out, out2 = buf[0], buf[1]
    with device_guard(x):
        moment_partial_kernel[(nk, nk, split * views)](
            x, out, other if other is not None else out, x2, out2,
            b, k, x.stride(0), x.stride(1),
            rows_per_split, IS_FP32=is_fp32(x.dtype), UPCAST=upcast_bf16_dot(x.dtype),
            DOT_WITH_OTHER=other is not None, VIEWS=views,
            GROUP=tile_group(x.dtype, nk, rows_per_split * k * x.element_size()), **cfg,
        )
    return buf, split


def _slices_sum(out: torch.Tensor, split: int) -> torch.Tensor:
    return out[0] if split == 1 else out.sum(dim=0)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``Xᵀ X`` = ``Σ_j x_j x_jᵀ`` as fp32 (k, k), from the storage dtype of ``x``."""
    if gram_backend("gram", x) == "cublas":
        return _mm_f32(x.T, x)
    out, split = _gram_launch(x, None)
    return _slices_sum(out, split)


def gram_pair(x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``Xᵀ X`` and ``X2ᵀ X2`` stacked, fp32 (2, k, k) contiguous (unpacks as two): one
    launch, and at most one torch sum of the row slices, bit-identical to two :func:`gram`
    calls, where the Triton kernel runs and the two share shape, dtype and strides; else
    two calls, copied into one buffer."""
    if gram_backend("gram", x) == "triton" and _same_layout(x, x2):
        out, split = _gram_launch(x, None, x2)
        return out[:, 0] if split == 1 else out.sum(dim=1)
    both = torch.empty((2,) + (x.shape[1],) * 2, dtype=torch.float32, device=x.device)
    both[0], both[1] = gram(x), gram(x2)
    return both


def gram_dot(x: torch.Tensor, other: torch.Tensor, raw: bool = False) -> torch.Tensor:
    """``<other, Xᵀ X>_F`` (fp32 scalar) for a symmetric contiguous fp32 (k, k) ``other``,
    without writing ``Xᵀ X``.  ``raw``: the Triton kernel's flat per-program partials
    instead (a 1-dim fp32 tensor summing to it, for :func:`combine`; cuBLAS: the sum)."""
    if gram_backend("gram_dot", x) == "cublas":
        return (_mm_f32(x.T, x) * other).sum()
    out, _ = _gram_launch(x, other.contiguous())
    return out if raw else out.sum()


def gram_slices(xs: list[torch.Tensor]) -> torch.Tensor:
    """``Xᵀ X`` of one view or two (same shape and dtype) as row-slice partials, a contiguous
    (views, S, k, k) fp32 tensor for :func:`gram_finish` (which sums the slices): one launch
    where the Triton kernel runs and the views share a layout; else the whole Grams, S = 1."""
    x = xs[0]
    if gram_backend("gram", x) == "triton" and (len(xs) == 1 or _same_layout(x, xs[1])):
        buf, split = _gram_launch(x, None, xs[1] if len(xs) == 2 else None)
        return buf.view(len(xs), split, *buf.shape[-2:])
    if len(xs) == 1:
        return gram(x).view(1, 1, *(x.shape[1],) * 2)
    return gram_pair(*xs).unsqueeze(1)


# What a Gram's diagonal is in the Γ of gram_finish (kernels.gram.gram_finish_kernel's DIAG)
FINISH_DIAG = {"zero": 0, "coef": 1, "barlow": 2}


def gram_finish(part: torch.Tensor, *, scale: float = 1.0, mul: float = 1.0,
                diag: str = "zero", coef: torch.Tensor | None = None, need_grad: bool = True,
                out_dtype: torch.dtype = torch.float32, transpose: bool = False,
                pair: bool = False):
    """One launch of :func:`~minc_kernels.kernels.gram.gram_finish_kernel` over the row-slice
    partials ``part`` ((views, S, k, k) fp32 contiguous) of k×k Grams ``G = scale·Σ_s part``:
    ``(sq, gam)``.

    ``sq``: (views·tiles, 2) fp32 (``pair``: (tiles, 2)), per tile
    ``[Σ_{i≠j} G_ij², Σ_i G_ii²]`` (``diag="barlow"``:
    ``Σ_i (1 - G_ii)²`` in the second column), for :func:`combine`.  ``gam`` (``None``
    without ``need_grad``): ``Γ = mul·G`` off the diagonal, and on it 0 (``"zero"``),
    ``coef[v]`` (``"coef"``: a (views, k) fp32 tensor, rows contiguous) or ``2 G_ii - 2``
    (``"barlow"``).  fp32 without ``transpose``: written in place over ``part[:, 0]``, a
    (views, k, k) view of it (no k×k buffer more).  Else a new contiguous (views, k, k)
    tensor of ``out_dtype``, with ``transpose`` (one view) (2, k, k): ``Γ`` and ``Γᵀ`` (two
    products then read one layout: one ``rowmat_pair`` launch).

    ``pair`` (two views, each program doing both): ``sq`` per tile ``[Σ G_0∘G_1, 0]`` and
    ``gam`` the two Grams themselves (``mul``, ``diag``, ``transpose`` unused), in place or
    in ``out_dtype`` as above: the spectral Gram path's ``<G1, G2>_F`` and its Grams
    rounded for the products (where a slice sum, a dot and a rounding copy did it)."""
    if (part.dim() != 4 or part.shape[2] != part.shape[3] or part.dtype != torch.float32
            or not part.is_contiguous()):
        raise ValueError(f"part must be a contiguous float32 (views, S, k, k) tensor, got "
                         f"{part.dtype} {tuple(part.shape)} strides {part.stride()}")
    views, split, k = part.shape[:3]
    if diag not in FINISH_DIAG:
        raise ValueError(f"diag must be one of {', '.join(map(repr, FINISH_DIAG))}, got {diag!r}")
    if diag == "coef" and (coef is None or coef.shape != (views, k) or coef.stride(-1) != 1
                           or coef.dtype != torch.float32):
        got = None if coef is None else f"{coef.dtype} {tuple(coef.shape)}"
        raise ValueError(f"diag='coef' needs coef as a float32 ({views}, {k}) tensor, got {got}")
    if transpose and views != 1:
        raise ValueError(f"transpose needs one view, got {views}")
    if pair and (views != 2 or transpose):
        raise ValueError(f"pair needs two views and no transpose, got {views} views, "
                         f"transpose={transpose}")
    if not need_grad:
        gam = gam_t = None
    elif out_dtype == torch.float32 and not transpose:
        gam = gam_t = part[:, 0]
    else:
        gam = torch.empty((2 if transpose else views, k, k), dtype=out_dtype, device=part.device)
        gam_t = gam[1] if transpose else gam
    n_t = cdiv(k, configs.FINISH_BLOCK)
    programs = 1 if pair else views
    sq = torch.empty((programs * n_t * n_t, 2), dtype=torch.float32, device=part.device)
    with device_guard(part):
        gram_finish_kernel[(n_t, n_t, programs)](
            part, coef if diag == "coef" else sq, gam if need_grad else sq,
            gam_t if need_grad else sq, sq, k, split, gam.stride(0) if need_grad else 0,
            float(scale), float(mul), DIAG=FINISH_DIAG[diag], PAIR=bool(pair),
            NEED_GRAD=bool(need_grad), TRANSPOSE=bool(transpose),
            RNE_BF16=interpreting() and out_dtype == torch.bfloat16,
            BLOCK=configs.FINISH_BLOCK, num_warps=configs.FINISH_WARPS)
    return sq, gam


# ----------------------------------------------------------------------------- Barlow Twins / VICReg
def cross_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Xᵀ Y`` as fp32 (k, k), from the storage dtype (tiles and row split as :func:`gram`)."""
    if gram_backend("cross_gram", x) == "cublas":
        return _mm_f32(x.T, y)
    out, split = cross_gram_partials(x, y)
    return _slices_sum(out, split)


def cross_gram_partials(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The Triton ``Xᵀ Y``'s row-slice partials, (S, k, k) fp32, and S: for a caller that
    sums them in its own pass (:func:`gram_finish`)."""
    b, k = x.shape
    cfg = configs.cross_gram_config(k, x.dtype)
    nk = cdiv(k, cfg["BLOCK_K"])
    split, rows_per_split = _row_split(b, cfg["BLOCK_B"], nk * nk, x.device)
    out = torch.empty(split, k, k, dtype=torch.float32, device=x.device)
    with device_guard(x):
        cross_gram_kernel[(nk, nk, split)](
            x, y, out, b, k, x.stride(0), x.stride(1), y.stride(0), y.stride(1), rows_per_split,
            IS_FP32=is_fp32(x.dtype), UPCAST=upcast_bf16_dot(x.dtype),
            GROUP=tile_group(x.dtype, nk, 2 * rows_per_split * k * x.element_size()), **cfg,
        )
    return out, split


# A column-statistics launch whose bytes take less than this at the copy bandwidth runs
# unsplit whatever its grid: a row split adds a launch (and a small torch sum), and such a
# launch is bound by its latency (~4-5 us on an H100), not by its grid.  Half the latency
# bound of benchmarks/static_sm90.py, so every launch that suite checks for grid fill splits.
# (tests/conftest.py sets it to 0: the tests' small shapes take the split where it applies.)
COLSTATS_SPLIT_MIN_SECONDS = 2.5e-6


def _colstats_split(b: int, k: int, nbytes: int, cfg, device: torch.device) -> tuple[int, int]:
    """``(slices, rows per slice)`` of a column-statistics launch that moves ``nbytes``: one
    slice while the column blocks alone fill the device (or the launch is small), otherwise
    the row split of :func:`_row_split` over ``cdiv(k, BLOCK_K)`` column blocks."""
    nk = cdiv(k, cfg["BLOCK_K"])
    if nk >= num_sms(device) or nbytes < COLSTATS_SPLIT_MIN_SECONDS * DEVICE_BW:
        return 1, b
    return _row_split(b, cfg["BLOCK_B"], nk, device)


def col_stats(x: torch.Tensor, y: torch.Tensor, standardize: bool, eps: float,
              transposed: bool):
    """Per-column statistics of two (B, k) views and their centred (or, ``standardize``,
    batch-standardised) copies in the storage dtype: ``(xo, yo, stats)``.

    ``xo``/``yo`` are (B, k) views of contiguous (k, B) buffers when ``transposed`` (what the
    N×N Gram path multiplies), of contiguous (B, k) buffers otherwise.  ``stats``: (10, k)
    fp32, rows as :func:`~minc_kernels.kernels.gram.colstats_kernel` documents."""
    b, k = x.shape

    def out():
        if transposed:
            return torch.empty((k, b), dtype=x.dtype, device=x.device).T
        return torch.empty((b, k), dtype=x.dtype, device=x.device)

    xo, yo = out(), out()
    stats = torch.empty((10, k), dtype=torch.float32, device=x.device)
    cfg = configs.colstats_config(k)
    # bytes: both views read, both outputs written (the static suite's model)
    split, rows = _colstats_split(b, k, 4 * b * k * x.element_size(), cfg, x.device)
    grid = (cdiv(k, cfg["BLOCK_K"]), split)
    # row split: per-slice moments (rows 0-4), then per-slice output sums (rows 5-7)
    part = torch.empty((split, 8, k), dtype=torch.float32, device=x.device) if split > 1 else stats
    with device_guard(x):
        if split > 1:
            colstats_partial_kernel[grid](
                x, y, part, b, k, x.stride(0), x.stride(1), y.stride(0), y.stride(1), rows,
                **cfg,
            )
        colstats_kernel[grid](
            x, y, xo, yo, stats, part, b, k, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            xo.stride(0), xo.stride(1), yo.stride(0), yo.stride(1), float(eps), rows,
            STANDARDIZE=bool(standardize), RNE_BF16=interpreting() and x.dtype == torch.bfloat16,
            SPLIT=split > 1, SPLIT_P=next_pow2(split), **cfg,
        )
    if split > 1:
        torch.sum(part[:, 5:8], dim=0, out=stats[6:9])
    return xo, yo, stats


def col_terms(stats: torch.Tensor, n: int, vicreg: bool, pairwise: bool = False, *,
              lam: float = 0.0, mu: float = 0.0, nu: float = 0.0, eps: float = 0.0,
              alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-column terms of a loss from :func:`col_stats`' ``stats`` (N rows), in one
    launch of :func:`~minc_kernels.kernels.gram.colstats_terms_kernel`: ``(coef, base)``,
    ``coef`` (2, k) fp32 and ``base`` a 0-dim fp32.

    ``vicreg`` (centred stats; ``mu``, ``nu``, ``lam``, ``eps``, ``alpha`` = the N×N / k×k
    gradient's ``α``): ``coef`` per view ``h - α Σ zc²`` (``pairwise``) or ``h`` (the
    variance hinge's factor), ``base`` = the invariance and variance terms, minus the Gram
    diagonal with ``pairwise``; add ``ν/((N-1)² k)`` × the two Frobenius norms (N×N) or
    off-diagonal sums (k×k).  Barlow Twins' N×N path (``lam``): ``coef`` = ``C_ii`` (from
    ``stats``) and ``2 C_ii - 2``, ``base = Σ (1 - C_ii)² - λ Σ C_ii²`` (add ``λ ‖C‖_F²``)."""
    k = stats.shape[1]
    f32 = torch.float32
    coef = torch.empty((2, k), dtype=f32, device=stats.device)
    base = torch.empty((), dtype=f32, device=stats.device)
    kn = float(k) * (n - 1)
    with device_guard(stats):
        colstats_terms_kernel[(1,)](
            stats, coef, base, k, float(n),
            float(eps), -float(mu), 2.0 * kn, float(alpha), float(lam) / (float(n) * k),
            0.5 * float(mu) / k, float(nu) / (kn * (n - 1)) if pairwise else 0.0, float(lam),
            VICREG=bool(vicreg), PAIRWISE=bool(pairwise),
            BLOCK=min(1024, max(16, next_pow2(k))), num_warps=8,
        )
    return coef, base


def col_stats_backward(gx: torch.Tensor, gy: torch.Tensor, nx: torch.Tensor | None,
                       ny: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor,
                       stats: torch.Tensor, inv_coef: float, in_place: bool = False):
    """Gradients with respect to ``x``, ``y`` (contiguous fp32 (B, k)) from the fp32
    gradients ``gx``, ``gy`` (any strides) with respect to :func:`col_stats`' outputs:
    the standardisation's Jacobian when ``nx``/``ny`` (its outputs) are given, the
    centring's otherwise; plus ``±inv_coef·(x - y)`` when ``inv_coef != 0``.

    ``in_place``: written into ``gx``/``gy`` (which must then be contiguous (B, k)), saving
    two fp32 (B, k) buffers: the column sums of ``g`` are complete (in the program, or in
    the row split's first launch) before any element is overwritten, and each element is
    overwritten by the program that read it, after reading it."""
    b, k = x.shape
    standardize = nx is not None
    nx = nx if standardize else gx
    ny = ny if standardize else gy
    if in_place:
        for name, g in (("gx", gx), ("gy", gy)):
            if g.shape != (b, k) or not g.is_contiguous() or g.dtype != torch.float32:
                raise ValueError(f"in_place needs {name} as a contiguous float32 ({b}, {k}) "
                                 f"tensor, got {g.dtype} {tuple(g.shape)} strides {g.stride()}")
        ox, oy = gx, gy
    else:
        ox = torch.empty((b, k), dtype=torch.float32, device=x.device)
        oy = torch.empty((b, k), dtype=torch.float32, device=x.device)
    cfg = configs.colstats_config(k)
    # bytes: fp32 g read and o written for both views, plus the standardised copies and the
    # inputs where they are read (the static suite's model)
    nbytes = b * k * (16 + 2 * x.element_size() * (standardize + (inv_coef != 0.0)))
    split, rows = _colstats_split(b, k, nbytes, cfg, x.device)
    grid = (cdiv(k, cfg["BLOCK_K"]), split)
    part = torch.empty((split, 4, k), dtype=torch.float32, device=x.device) if split > 1 else stats
    strides = (gx.stride(0), gx.stride(1), gy.stride(0), gy.stride(1),
               nx.stride(0), nx.stride(1), ny.stride(0), ny.stride(1))
    with device_guard(x):
        if split > 1:  # in place too: every slice's sums are read before any row is written
            colstats_backward_partial_kernel[grid](
                gx, gy, nx, ny, part, b, k, *strides, rows, STANDARDIZE=standardize, **cfg,
            )
        colstats_backward_kernel[grid](
            gx, gy, nx, ny, x, y, stats, part, ox, oy, b, k, *strides,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), float(inv_coef), rows,
            STANDARDIZE=standardize, INVARIANCE=inv_coef != 0.0, SPLIT=split > 1,
            SPLIT_P=next_pow2(split), **cfg,
        )
    return ox, oy
