"""Spectral contrastive loss launchers and ``torch.library`` op (docs/math.md §1).

Op ``minc_kernels::spectral_loss_fwd(z1, z2, mu, clip, algorithm, need_grad)
-> (loss, grad_z1, grad_z2)``: the fp32 loss and, with ``need_grad``, the fp32 gradients
for a unit upstream gradient (empty otherwise; non-differentiable outputs).  Backward only
scales them.  ``algorithm`` is ``"pairwise"``, ``"matrix"``, ``"gram"`` or ``"auto"``,
resolved inside the op by :func:`choose_algorithm` (a measured table for the GPU family,
else the cost model), so a compiled graph chooses at run time on the real sizes.

Passes:

1. :func:`~minc_kernels.kernels.spectral.clip_rows_dot_kernel`: clipped rows (storage
   dtype, like the reference) and ``d_i = z1c_i·z2c_i``.
2. pairwise: :func:`~minc_kernels.kernels.spectral.pairwise_offdiag_kernel` on
   ``(Z1c, Z2c)`` (loss partials, ``dZ1c``) and, for the gradient, in the same launch on
   ``(Z2c, Z1c)`` (``dZ2c``), recomputing ``S`` tiles once per ``BLOCK_C`` columns of the
   gradient (O(Bk) memory, but ``cdiv(k, BLOCK_C)`` times the ``2B²k`` flops of ``S``);
   matrix (with a gradient; without one it is the pairwise pass, which then never
   recomputes): ``S = Z1c Z2cᵀ`` written once (B×B fp32,
   :func:`~minc_kernels.ops.gram.cross_gram_partials` on the transposed views), then
   :func:`~minc_kernels.ops.gram.gram_finish` (row slices summed,
   diagonal zeroed, ``Σ_{i≠j} S_ij²``, ``S`` rounded to the storage dtype as the pairwise
   kernel and eager autograd round it, and written with its transpose), and
   ``dZ1cᵀ = Z2cᵀ offdiag(S)ᵀ``, ``dZ2cᵀ = Z1cᵀ offdiag(S)`` by one
   :func:`~minc_kernels.ops.gram.rowmat_pair` launch on the transposed views, written
   through transposed views of contiguous (B, k) gradients (O(B²) memory, ``6B²k`` flops:
   the choice when B < k); gram: ``G1 = Z1cᵀZ1c``,
   ``G2 = Z2cᵀZ2c`` and, for the gradient, ``Z1c G2 - d∘Z2c`` / ``Z2c G1 - d∘Z1c``
   (:mod:`minc_kernels.ops.gram` launchers, both views in one launch each), whose fused
   partial ``Σ z1cᵀ G2 z1c = <G1, G2>_F`` also gives the loss (bf16: ``<G1, G2>_F`` of the
   fp32 Grams per tile, in the pass that rounds them to bf16 for the products:
   :func:`_gram_grad`).
3. :func:`~minc_kernels.kernels.spectral.clip_rows_backward_kernel`: the clipping Jacobian
   of both views (one launch).

``tl.dot`` precision: fp32 inputs ``input_precision="ieee"`` (strict fp32, no TF32) in
every dot; bf16/fp16 inputs: native half dots for ``Z Zᵀ``/``Zᵀ Z``/``offdiag(S) Z``
(``S`` rounded to the storage dtype for that second dot, as eager autograd does), and
``Z G`` with ``G`` rounded to bf16 (bf16: one native dot, as eager autograd rounds it) or
the fp32 ``G`` as two TF32 dots (fp16: a fp16 ``G`` could overflow).  fp32
accumulation and fp32 partials throughout; no atomics (deterministic).

Double backward is not supported: backward scales a saved, non-differentiable gradient,
so second derivatives through these ops would come out as zero (use the reference).
"""
from __future__ import annotations

import functools
import math

import torch

from ..kernels.spectral import (clip_rows_backward_kernel, clip_rows_dot_kernel,
                                pairwise_offdiag_kernel)
from . import configs
from ._common import (DEVICE_BW, DEVICE_FLOPS, TARGET_PROGRAMS, TARGET_SMS, cdiv, device_guard,
                      is_fp32, upcast_bf16_dot)
from ._grad_in_forward import register_grad_in_forward
from . import tables
from .gram import (combine, cross_gram, cross_gram_partials, gram, gram_backend, gram_dot,
                   gram_finish, gram_slices, rounds_operand, rowmat_pair)

__all__ = ["spectral_loss", "spectral_loss_fwd", "spectral_forward", "choose_algorithm",
           "estimate_seconds", "ALGORITHMS"]

#: The op's algorithms (``"auto"`` chooses among them).
ALGORITHMS = ("pairwise", "matrix", "gram")

_LAUNCH_S = 4e-6  # device time one launch adds (start and drain of a kernel or torch op)
# Host time per launch: the H200 run of 15384f2 measured one Triton launch at 26 µs
# synchronised, 19 µs above an empty synchronise (gpu_floor.json); torch ops cost less on
# the host.  10 µs is the rough mean the model takes: a guess until a table is measured.
_HOST_LAUNCH_S = 10e-6
_RESIDENT_PROGRAMS = TARGET_PROGRAMS  # H100 SMs × the 2 programs per SM the tile sizes allow


def _fill(programs: int) -> float:
    """Fraction of the device a launch of ``programs`` CTAs keeps busy, wave by wave:
    ``programs / (waves · SMs)``.  4 CTAs on 132 SMs run at 4/132 of the device; 133 take two
    waves.  One CTA per SM is the unit: the tile kernels hold 1-3 CTAs per SM on sm_90."""
    waves = cdiv(max(programs, 1), TARGET_SMS)
    return max(programs, 1) / (waves * TARGET_SMS)


# ----------------------------------------------------------------------------- cost model
def estimate_seconds(b: int, k: int, dtype: torch.dtype, need_grad: bool, *,
                     round_grams: bool = True, finish: int = 0) -> dict[str, float]:
    """Rough H100 time of each algorithm: the larger of its device time, Σ over launches
    of (flops/peak + DRAM bytes/bandwidth) / fill + launch latency, and its host time,
    launches × :data:`_HOST_LAUNCH_S` (small shapes are bound by the host).

    Uses the device tile sizes and splits (not the interpreter's), so the choice depends only
    on (B, k, dtype, need_grad).  ``fill`` (:func:`_fill`) is the share of the 132 SMs the
    launch's grid keeps busy over its waves.  DRAM bytes = compulsory traffic + re-streamed
    operand tiles divided by the number of programs resident at once (they stream the same
    tiles in the same order, so L2 serves the rest).  Pairwise: ``S`` tiles cost ``2B²k``;
    with gradients each view's programs (one launch) recompute them once per
    ``BLOCK_C``-wide chunk of output columns and add ``2B²k`` for ``offdiag(S) Z``, plus the
    split partials' sums.
    Gram: two symmetric Grams (``≈Bk²`` each) and, with gradients, two ``Z G`` products
    (``2Bk²`` each; split dots, or with ``round_grams`` native ones on operands rounded to
    bf16 for bf16 rows, as the spectral op and Barlow Twins' k×k path do; VICReg and the
    N×N paths, priced with ``round_grams=False``, keep fp32 operands), the two views of
    each in one launch.  The spectral op with a gradient: one pass over both Grams where
    their rows are split or they are rounded (the slices summed; bf16: ``<G1, G2>_F`` per
    tile and both rounded, 4k² bytes written).  ``finish`` (Barlow Twins' and VICReg's k×k
    paths: the number of k×k matrices, Barlow Twins' one ``C``, VICReg's two Grams): the
    Gram launch writes that many matrices' row slices (its flops are the same: ``C`` is
    not symmetric), one :func:`~minc_kernels.ops.gram.gram_finish` pass reads them and
    writes ``Γ`` (rounded where it is: 4 bytes an element either way), with or without a
    gradient, and no torch op; Barlow Twins' fp16/fp32 products (two launches) are priced
    as one.
    Matrix (with gradients; without, it is the pairwise pass): ``S`` (``2B²k``, written
    once), one pass over it (diagonal, ``Σ S²``, rounding) and two ``Zᵀ Sᵀ`` products
    (``2B²k`` each, one native dot per tile), both views in one launch.
    The launches shared by all (clipping, its backward, which also sums the pairwise
    path's split partials, and the loss's ``combine_kernel``) are left out of both times.
    """
    isz = torch.empty((), dtype=dtype).element_size()
    half = not is_fp32(dtype)
    rate_same = DEVICE_FLOPS["half"] if half else DEVICE_FLOPS["fp32"]
    rate_rhs = DEVICE_FLOPS["half_x_f32"] if half else DEVICE_FLOPS["fp32"]

    def launch(flops, rate, compulsory, streamed, programs):
        reuse = max(1, min(programs, _RESIDENT_PROGRAMS))
        return ((flops / rate + (compulsory + streamed / reuse) / DEVICE_BW) / _fill(programs)
                + _LAUNCH_S)

    def total(device_s: float, launches: int) -> float:
        return max(device_s, launches * _HOST_LAUNCH_S)

    pc = configs.pairwise_config(b, k, dtype, for_device=True)
    n_m = cdiv(b, pc["BLOCK_M"])
    n_split, _ = configs.pairwise_split(b, k, need_grad, pc)
    if need_grad:  # one launch, both views' programs (its loss partials: the shared combine)
        n_c = cdiv(k, pc["BLOCK_C"])
        pairwise = launch(2 * (n_c * 2.0 * b * b * k + 2.0 * b * b * k), rate_same,
                          2 * (2 * isz * b * k + 4 * b * k * n_split),
                          2 * n_m * n_c * (b * k + b * pc["BLOCK_C"]) * isz,
                          2 * n_m * n_c * n_split)
        pairwise_launches = 1
        if n_split > 1:  # the split partials, summed in the shared clipping pass: their bytes
            pairwise += 2 * 4 * n_split * b * k / DEVICE_BW
    else:
        pairwise = launch(2.0 * b * b * k, rate_same, 2 * isz * b * k, n_m * b * k * isz,
                          n_m * n_split)
        pairwise_launches = 1
    pairwise = total(pairwise, pairwise_launches)

    gc = configs.gram_config(k, dtype, for_device=True)
    n_k = cdiv(k, gc["BLOCK_K"])
    tiles = n_k * (n_k + 1) // 2
    n_b = cdiv(b, gc["BLOCK_B"])
    g_split = max(1, min(n_b, cdiv(2 * TARGET_SMS, tiles)))  # as ops.gram._gram_launch
    # Without a gradient: G1 written, then G2 only reduced against G1 (two launches).  With
    # it, or ``finish``: both Grams in one launch, then both Z G products in one (views = 2).
    views = 2 if need_grad or finish else 1
    written = finish or views  # k×k matrices written (their row slices)
    t_gram = (2 // views) * launch(views * b * k * (k + gc["BLOCK_K"]), rate_same,
                                   views * isz * b * k + written * 4 * k * k * g_split,
                                   views * (n_k + 1) * b * k * isz, views * tiles * g_split)
    rounds = need_grad and round_grams and rounds_operand(dtype)
    if finish:  # one pass: the matrices' slices read, Γ written (4 bytes an element)
        t_gram += finish * (4 * g_split + 4) * k * k / DEVICE_BW + _LAUNCH_S
        gram_launches, torch_ops = 2 + need_grad, 0
    elif need_grad:
        # the spectral op: one pass over both Grams where their rows are split or they are
        # rounded (slices summed; bf16: <G1, G2>_F per tile, both rounded, 4k² written)
        passes = rounds or g_split > 1
        if passes:
            t_gram += (8 * g_split + (4 if rounds else 8)) * k * k / DEVICE_BW + _LAUNCH_S
        gram_launches, torch_ops = 2 + passes, 0
    else:
        # G1's row slices summed by a torch op where split; gram_dot's partials, like the
        # product's, go to the shared combine unsummed (so does Σ d²)
        torch_ops = 1 if g_split > 1 else 0
        gram_launches = 2 + torch_ops  # Triton: gram and gram_dot
    if need_grad:
        rc = configs.rowmat_config(k, dtype, for_device=True, b=b)
        n_rm, n_rn = cdiv(b, rc["BLOCK_M"]), cdiv(k, rc["BLOCK_N"])
        g_bytes, rate = (2, rate_same) if rounds else (4, rate_rhs)
        t_gram += launch(2 * 2.0 * b * k * k, rate,
                         2 * (g_bytes * k * k + 2 * isz * b * k + 4 * b * k),
                         2 * (n_rm * g_bytes * k * k + n_rn * isz * b * k), 2 * n_rm * n_rn)
    t_gram += torch_ops * _LAUNCH_S
    matrix = _matrix_seconds(b, k, dtype, launch) if need_grad else None
    return {"pairwise": pairwise,
            "matrix": total(matrix, 3) if need_grad else pairwise,
            "gram": total(t_gram, gram_launches)}


def _matrix_seconds(b: int, k: int, dtype: torch.dtype, launch) -> float:
    """The matrix path's device time with gradients (:func:`estimate_seconds`' ``launch``
    prices each launch; three launches): ``cross_gram`` on the transposed views (rows k,
    columns B), one pass over its row slices (``gram_finish_kernel``; its partials go to
    the shared combine), and one ``rowmat`` launch of both views (rows k, columns B), whose
    own partials are not summed."""
    isz = torch.empty((), dtype=dtype).element_size()
    rate = DEVICE_FLOPS["fp32"] if is_fp32(dtype) else DEVICE_FLOPS["half"]
    xc = configs.cross_gram_config(b, dtype, for_device=True)
    n_t = cdiv(b, xc["BLOCK_K"])
    split = max(1, min(cdiv(k, xc["BLOCK_B"]), cdiv(2 * TARGET_SMS, n_t * n_t)))
    t = launch(2.0 * k * b * b, rate, 2 * isz * b * k + 4 * b * b * split,
               2 * n_t * b * k * isz, n_t * n_t * split)
    # gram_finish_kernel (the slices read, S' and S'ᵀ written)
    t += (4 * split + 2 * isz) * b * b / DEVICE_BW + _LAUNCH_S
    rc = configs.rowmat_config(b, dtype, for_device=True, b=k)
    n_m, n_n = cdiv(k, rc["BLOCK_M"]), cdiv(b, rc["BLOCK_N"])
    return t + launch(2 * 2.0 * k * b * b, rate, 2 * (isz * b * b + 2 * isz * b * k + 4 * b * k),
                      2 * (n_m * isz * b * b + n_n * isz * b * k), 2 * n_m * n_n)


@functools.lru_cache(maxsize=1024)
def model_choice(b: int, k: int, dtype: torch.dtype, need_grad: bool) -> str:
    """The algorithm of :data:`ALGORITHMS` that :func:`estimate_seconds` says is fastest (the
    first of equals).  Cached: it depends only on its arguments (device tiles, not the
    interpreter's), and the model costs tens of µs of host time per call."""
    est = estimate_seconds(b, k, dtype, need_grad)
    return min(ALGORITHMS, key=est.__getitem__)


def choose_algorithm(b: int, k: int, dtype: torch.dtype, need_grad: bool,
                     device: torch.device | None = None) -> str:
    """What ``algorithm="auto"`` runs: the measured table of ``device``'s GPU family where
    one answers (:mod:`minc_kernels.ops.tables`, decision ``spectral/<dtype>/<grad>``), else
    :func:`model_choice`."""
    if device is not None:
        got = tables.choose(tables.algorithm_decision("spectral", dtype, need_grad), device,
                            b, k, ALGORITHMS)
        if got is not None:
            return got
    return model_choice(b, k, dtype, need_grad)


# ----------------------------------------------------------------------------- launchers
def _same_strides(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``y`` with one set of strides, as the two-view kernels take them: unchanged
    when they already share theirs (always after clipping, and for the usual contiguous
    inputs), else contiguous copies."""
    if x.stride() == y.stride():
        return x, y
    return x.contiguous(), y.contiguous()


def _pairwise(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, need_grad: bool):
    """``(partials of Σ_{i≠j} (x_i·y_j)², gx, gy)``: with ``need_grad``
    ``gx = α·offdiag(X Yᵀ) Y + β·Y`` and ``gy = α·offdiag(X Yᵀ)ᵀ X + β·X``, both from one
    launch, each as its (splits, B, k) fp32 partials (summed by :func:`_finish_grads_`);
    else ``None, None``.  The loss partials: a (programs, splits) view, for
    :func:`~minc_kernels.ops.gram.combine`."""
    b, k = x.shape
    x, y = _same_strides(x, y)
    cfg = configs.pairwise_config(b, k, x.dtype)
    n_split, per_split = configs.pairwise_split(b, k, need_grad, cfg)
    n_c = cdiv(k, cfg["BLOCK_C"]) if need_grad else 1
    grid = (cdiv(b, cfg["BLOCK_M"]), n_c, n_split * (2 if need_grad else 1))
    part = torch.empty(grid[0], n_c, n_split, dtype=torch.float32, device=x.device)
    shape = (n_split, b, k) if need_grad else (1, 1, 1)
    out = torch.empty(shape, dtype=torch.float32, device=x.device)
    out2 = torch.empty(shape, dtype=torch.float32, device=x.device) if need_grad else out
    with device_guard(x):
        pairwise_offdiag_kernel[grid](
            x, y, out, out2, part, b, k, x.stride(0), x.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            float(alpha), float(beta), per_split,
            NEED_GRAD=bool(need_grad), IS_FP32=is_fp32(x.dtype), UPCAST=upcast_bf16_dot(x.dtype),
            **cfg,
        )
    off = part[:, 0]  # the first column chunk's programs hold the sum
    if not need_grad:
        return off, None, None
    # the splits' fp32 partials, (n_split, B, k) each: clip_rows_backward_kernel sums them
    return off, out, out2


def _matrix(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float):
    """``(partials of Σ_{i≠j} S_ij², gx, gy)`` from ``S = X Yᵀ`` written once (B×B fp32):
    ``gx = α·offdiag(S) Y + β·Y`` and ``gy = α·offdiag(S)ᵀ X + β·X``, fp32 contiguous (B, k).

    The Gram layer on the transposed views: ``S = cross_gram(Xᵀ, Yᵀ)`` (its row-slice
    partials), then :func:`~minc_kernels.ops.gram.gram_finish` (slices summed,
    ``S' = offdiag(S)``, ``Σ S'²``,
    ``S'`` rounded to the storage dtype, as the pairwise kernel and eager autograd round
    ``S``, written with its transpose), and ``gxᵀ = Yᵀ S'ᵀ`` / ``gyᵀ = Xᵀ S'`` by one
    ``rowmat_pair`` launch with rows = features, written through transposed views of the
    contiguous gradients."""
    b, k = x.shape
    xt, yt = x.T, y.T
    if gram_backend("cross_gram", xt) == "cublas":
        part, split = cross_gram(xt, yt).unsqueeze(0), 1
    else:
        part, split = cross_gram_partials(xt, yt)  # (Xᵀ)ᵀ Yᵀ = X Yᵀ, per row slice
    # one pass: the slices summed, the diagonal zeroed, Σ S'² per program, S' rounded to the
    # storage dtype (the products then take one native dot per tile: rowmat's MODE 4) and
    # written with its transpose, so that both products read G of one layout (one launch)
    sq, (s, s_t) = gram_finish(part.unsqueeze(0), out_dtype=x.dtype, transpose=True)
    off = sq[:, 0:1]
    gx = torch.empty((b, k), dtype=torch.float32, device=x.device)
    gy = torch.empty((b, k), dtype=torch.float32, device=x.device)
    # raw: the product's partials are not needed (the loss has Σ S'²), so nor is their sum
    rowmat_pair((y.T, s, y.T, None, gx.T), (x.T, s_t, x.T, None, gy.T), alpha, beta, 0.0,
                False, True, raw=True)
    return off, gx, gy


def _gram_grad(x: torch.Tensor, y: torch.Tensor, d: torch.Tensor, alpha: float, beta: float):
    """``(<G1, G2>_F = Σ_{i,j} S_ij² — a sum, or partials —, gx, gy)`` (the diagonal's
    ``Σ d²`` still in) through the k×k Grams ``G1 = XᵀX``, ``G2 = YᵀY`` (fp32, one launch):
    ``gx = α(X G2 - d∘Y) + β·Y = α·offdiag(S) Y + β·Y`` and ``gy = α(Y G1 - d∘X) + β·X``,
    both views in one ``rowmat_pair`` launch, whose fused partial ``Σ xᵀ G2 x = <G1, G2>_F``
    gives the loss, ``<G1, G2>_F - Σ d²`` (in the loss's ``combine``).

    bf16 rows multiply by the Grams **rounded to bf16** (rowmat's MODE 4: one native dot
    per tile, a third of the split MODE 1/3's three), as eager autograd multiplies by
    ``G`` rounded to the storage dtype; the loss keeps the fp32 Grams (``<G1, G2>_F`` per
    tile of the fp32 Grams, in the one pass that sums their row slices and rounds them,
    since the rounded Grams would not cancel against ``Σ d²`` to fp32 accuracy).  The
    gradients' error stays that of the output rounding: against a float64 oracle it is
    1.0-1.37x the fp32 Grams' and at most eager's at B 1024-8192, k 128-2048 (random,
    aligned and collapsed embeddings; docs/math.md §1).
    fp16 keeps the fp32 Grams (two TF32 dots): a fp16 Gram overflows at B·μ > 65504."""
    part = gram_slices([x, y])  # (2, S, k, k) row slices: one launch (same layout)
    rounds = rounds_operand(x.dtype)
    if rounds:  # one pass: the slices summed, <G1, G2>_F per tile, both rounded
        sq, grams = gram_finish(part, pair=True, out_dtype=x.dtype)
        frob = sq[:, 0:1]
    elif part.shape[1] > 1:  # the slices summed in place (the Frobenius dot unused)
        _, grams = gram_finish(part, pair=True)
    else:
        grams = part[:, 0]
    gram1, gram2 = grams
    # raw: the partials unsummed (the loss's combine sums them; no torch op here)
    part, (gx, gy) = rowmat_pair((x, gram2, y, d, None), (y, gram1, x, d, None),
                                 alpha, beta, -alpha, False, True, raw=True)
    if not rounds:
        frob = part[0, :, 0:1]  # the first view's Σ xᵀ G2 x partials, with the fp32 G2
    return frob, gx, gy


def _clip_rows_dot(z1: torch.Tensor, z2: torch.Tensor, mu: float, clip: bool):
    b, k = z1.shape
    d = torch.empty(b, dtype=torch.float32, device=z1.device)
    if clip:
        z1c = torch.empty((b, k), dtype=z1.dtype, device=z1.device)
        z2c = torch.empty((b, k), dtype=z2.dtype, device=z2.device)
        n1 = torch.empty(b, dtype=torch.float32, device=z1.device)
        n2 = torch.empty(b, dtype=torch.float32, device=z1.device)
    else:
        z1c, z2c, n1, n2 = z1, z2, d, d  # unused by the kernel without CLIP
    cfg = configs.rows_config(k)
    with device_guard(z1):
        clip_rows_dot_kernel[(cdiv(b, cfg["BLOCK_R"]),)](
            z1, z2, z1c, z2c, d, n1, n2, b, k,
            z1.stride(0), z1.stride(1), z2.stride(0), z2.stride(1), math.sqrt(mu),
            CLIP=bool(clip), **cfg,
        )
    return z1c, z2c, d, n1, n2


def _finish_grads_(z1: torch.Tensor, n1: torch.Tensor, g1: torch.Tensor, z2: torch.Tensor,
                   n2: torch.Tensor, g2: torch.Tensor, mu: float, clip: bool):
    """Both views' gradients from ``g1``/``g2``, each (B, k) or (splits, B, k) fp32 partials
    (contiguous): the splits summed in a fixed order and, with ``clip``, the clipping
    Jacobian applied, in place into the first split, in one launch (none where there is
    nothing to do).  Returns the two (B, k) gradients."""
    splits = g1.shape[0] if g1.dim() == 3 else 1
    out1, out2 = (g1[0], g2[0]) if g1.dim() == 3 else (g1, g2)
    if not clip and splits == 1:
        return out1, out2
    b, k = z1.shape
    z1, z2 = _same_strides(z1, z2)
    cfg = configs.rows_config(k)
    with device_guard(z1):
        clip_rows_backward_kernel[(cdiv(b, cfg["BLOCK_R"]), 2)](
            z1, n1, g1, z2, n2, g2, b, k, z1.stride(0), z1.stride(1), math.sqrt(mu), splits,
            SUMS=splits > 1, CLIP=bool(clip), **cfg,
        )
    return out1, out2


# ----------------------------------------------------------------------------- op
def spectral_forward(z1: torch.Tensor, z2: torch.Tensor, mu: float, clip: bool, algorithm: str,
                     need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of :func:`spectral_loss_fwd` (plain function: the static sm_90 suite calls it
    on meta tensors, which the custom op would send to its fake)."""
    b, k = z1.shape
    if algorithm == "auto":  # both exact: a speed choice on the real sizes, at run time
        algorithm = choose_algorithm(b, k, z1.dtype, need_grad, z1.device)
    elif algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be 'auto', 'pairwise', 'matrix' or 'gram', got "
                         f"{algorithm!r}")
    if algorithm == "matrix" and not need_grad:
        algorithm = "pairwise"  # the value alone: S's tiles are reduced, never recomputed
    z1c, z2c, d, n1, n2 = _clip_rows_dot(z1, z2, mu, clip)
    inv = 1.0 / (b * (b - 1) * mu)  # weight of Σ_{i≠j} S_ij²
    pos = -2.0 / (b * mu)  # weight of Σ_i d_i
    g1 = g2 = None
    if algorithm == "pairwise":
        off, g1, g2 = _pairwise(z1c, z2c, 2.0 * inv, pos, need_grad)
    elif algorithm == "matrix":
        off, g1, g2 = _matrix(z1c, z2c, 2.0 * inv, pos)
    else:
        if need_grad:
            off, g1, g2 = _gram_grad(z1c, z2c, d, 2.0 * inv, pos)
        else:
            # <G1, G2>_F reduced tile by tile while G2 is formed: G2 is never written
            # (its partials summed by the combine below)
            off = gram_dot(z2c, gram(z1c), raw=True)
    if need_grad:  # the pairwise path's split partials summed, the clipping Jacobian
        g1, g2 = _finish_grads_(z1, n1, g1, z2, n2, g2, mu, clip)
    # pos·Σ d + inv·(Σ off - Σ d² on the Gram path, whose <G1, G2>_F has the diagonal)
    loss = combine(d, pos, off, inv, -1.0 if algorithm == "gram" else None)
    if not need_grad:
        # two tensors: outputs of a custom op must not alias each other
        g1 = z1.new_empty((0,), dtype=torch.float32)
        g2 = z1.new_empty((0,), dtype=torch.float32)
    return loss, g1, g2


@torch.library.custom_op("minc_kernels::spectral_loss_fwd", mutates_args=())
def spectral_loss_fwd(z1: torch.Tensor, z2: torch.Tensor, mu: float, clip: bool, algorithm: str,
                      need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, dL/dz1, dL/dz2)``: fp32 scalar and fp32 (B, k) gradients ((0,) without ``need_grad``)."""
    return spectral_forward(z1, z2, mu, clip, algorithm, need_grad)


@spectral_loss_fwd.register_fake
def _spectral_loss_fwd_fake(z1, z2, mu, clip, algorithm, need_grad):
    shape = tuple(z1.shape) if need_grad else (0,)
    return (z1.new_empty((), dtype=torch.float32), z1.new_empty(shape, dtype=torch.float32),
            z1.new_empty(shape, dtype=torch.float32))


_spectral_loss = register_grad_in_forward(spectral_loss_fwd, need_grad_index=5, grad_inputs=(0, 1),
                                          what="minc_kernels::spectral_loss_fwd",
                                          body=spectral_forward)


# ----------------------------------------------------------------------------- API
def spectral_loss(z1: torch.Tensor, z2: torch.Tensor, mu: float, clip: bool,
                  algorithm: str) -> torch.Tensor:
    """Fp32 scalar spectral contrastive loss (docs/math.md §1), differentiable wrt ``z1`` and ``z2``."""
    need_grad = torch.is_grad_enabled() and (z1.requires_grad or z2.requires_grad)
    loss, _, _ = _spectral_loss(z1, z2, float(mu), bool(clip), algorithm, need_grad)
    return loss
