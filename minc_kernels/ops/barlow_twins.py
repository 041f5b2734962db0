"""Barlow Twins launchers and ``torch.library`` op (docs/math.md §7), on the shared Gram layer.

Op ``minc_kernels::barlow_twins_loss_fwd(z_a, z_b, lambda_param, algorithm, need_grad)
-> (loss, grad_z_a, grad_z_b)``: the fp32 loss and, with ``need_grad``, the fp32 gradients
for a unit upstream gradient (empty otherwise); the autograd is
:func:`~minc_kernels.ops._grad_in_forward.register_grad_in_forward` (backward only scales).
``algorithm`` is ``"pairwise"``, ``"gram"`` or ``"auto"``, resolved inside the op (at run
time, on the real sizes) by :func:`choose_algorithm`: a measured table for the GPU family
(:mod:`minc_kernels.ops.tables`) where one answers, else the spectral loss's cost model
(:func:`minc_kernels.ops.spectral.estimate_seconds`), whose ``"gram"`` estimate prices
exactly the launches both evaluations make (Grams + fused ``rowmat``), on ``Z`` (k×k) or
on ``Zᵀ`` (N×N).  Its ``"pairwise"`` estimate prices the spectral pairwise-tile kernel,
which these losses do not use: ``ops.spectral.choose_algorithm`` itself would pick the
k×k form at N = 256, k = 8192 in fp32 (forward: a 256 MiB ``C`` and 34 GFLOP where the
N×N form needs about 2).

Passes:

1. :func:`~minc_kernels.ops.gram.col_stats` (one kernel, both views): column means and
   biased variances, the standardised ``Ẑa``, ``Ẑb`` (storage dtype; stored (k, N) for
   the N×N path) and ``C_ii = Σ_n ẑa_ni ẑb_ni / N``.  The loss's diagonal terms (and
   ``C_ii``, the N×N path's ``d``) come from :func:`~minc_kernels.ops.gram.col_terms` (one
   program): from these ``C_ii`` on the N×N path, from ``C``'s own diagonal on the k×k one.
2. ``"gram"``: ``C = Ẑaᵀ Ẑb / N`` (:func:`~minc_kernels.ops.gram.cross_gram`, k×k fp32,
   written), ``‖C‖_F²``; gradient ``Γ = ∂L/∂C`` formed in place in ``C``, then
   ``Ẑb Γᵀ / N`` and ``Ẑa Γ / N`` (:func:`_times_gamma`: bf16 rows take ``Γ`` and ``Γᵀ``
   rounded to bf16 into one buffer, one ``rowmat_pair`` launch, as eager autograd rounds
   ``∂L/∂C``; fp16/fp32 rows the fp32 ``Γ`` and ``Γᵀ``, two launches).
   ``"pairwise"``: ``G_a = Ẑa Ẑaᵀ`` (N×N fp32, written) and, without a gradient,
   ``<G_a, Ẑb Ẑbᵀ>_F`` reduced tile by tile (:func:`~minc_kernels.ops.gram.gram_dot`: the
   second N×N Gram is never written); with a gradient ``G_b`` too, and
   ``(2λ/N²) Ẑaᵀ G_b + diag(δ/N) Ẑbᵀ`` by ``rowmat`` on the transposed views, whose fused
   partial gives ``<G_a, G_b>_F``.
3. :func:`~minc_kernels.ops.gram.col_stats_backward`: the standardisation's Jacobian.

Memory beyond tiles: the k×k ``C`` (``"gram"``) or one (forward) / two (with gradient)
N×N Grams (``"pairwise"``) are written in fp32: the gradient needs the whole matrix
before its product with the other view (a tiles-only form would recompute each Gram
tile once per output column block; docs/performance.md says why we keep the matrix);
they are freed before pass 3 (``"gram"``: ``C``'s row slices where k is small enough for
its tiles alone to leave SMs idle, and with bf16 rows ``Γ`` and ``Γᵀ`` in bf16, 4k²
bytes).  Standardised copies of both views (2·N·k, storage dtype) and the fp32 gradients
(2·N·k), which pass 3 overwrites in place: with the gradient, at most
``2·N·k·(itemsize + 4)`` bytes plus the k×k matrix (``"gram"``, 4k² bytes) or the two N×N
ones (8N² bytes); measured by ``benchmarks/op_memory.py``.  Deterministic (no atomics).
"""
from __future__ import annotations

import functools

import torch

from ..losses.barlow_twins import BN_EPS
from ._grad_in_forward import register_grad_in_forward
from .gram import (col_stats, col_stats_backward, col_terms, combine, cross_gram,
                   cross_gram_partials, gram, gram_backend, gram_dot, gram_finish, gram_pair,
                   rounded, rounds_operand, rowmat_pair)
from . import tables
from .spectral import estimate_seconds

__all__ = ["barlow_twins_loss", "barlow_twins_loss_fwd", "barlow_twins_forward",
           "choose_algorithm", "model_choice", "model_estimates", "cross_correlation",
           "barlow_twins_cross_corr"]


def choose_algorithm(n: int, k: int, dtype: torch.dtype, need_grad: bool,
                     device: torch.device | None = None, loss: str = "barlow_twins") -> str:
    """``"pairwise"`` (N×N) or ``"gram"`` (k×k) for Barlow Twins and VICReg (``loss``): the
    measured table of ``device``'s GPU family (decision ``<loss>/<dtype>/<grad>``) where one
    answers, else the spectral cost model's Gram-path time of ``Zᵀ`` (N×N Grams) against that
    of ``Z`` (k×k)."""
    if device is not None:
        got = tables.choose(tables.algorithm_decision(loss, dtype, need_grad), device, n, k,
                            ("pairwise", "gram"))
        if got is not None:
            return got
    return model_choice(n, k, dtype, need_grad, loss)


@functools.lru_cache(maxsize=1024)
def model_choice(n: int, k: int, dtype: torch.dtype, need_grad: bool,
                 loss: str = "barlow_twins") -> str:
    """The cost model's side: :func:`~minc_kernels.ops.spectral.estimate_seconds`' Gram-path
    time of ``Zᵀ`` (N×N Grams) against that of ``Z`` (k×k).  Cached, as the spectral
    ``model_choice``: it depends only on its arguments, and two estimates cost about 100 µs
    of host time per call (``benchmarks/results/cpu-host-overhead-2026-12-06b/``)."""
    est = model_estimates(n, k, dtype, need_grad, loss)
    return "pairwise" if est["pairwise"] < est["gram"] else "gram"


def model_estimates(n: int, k: int, dtype: torch.dtype, need_grad: bool,
                    loss: str = "barlow_twins") -> dict[str, float]:
    """Seconds of ``"pairwise"`` (the Gram path of ``Zᵀ``, N×N) and ``"gram"`` (of ``Z``,
    k×k) by the spectral cost model, as :func:`model_choice` compares them."""
    # the k×k paths finish their Grams in one pass (Barlow Twins' rounds Γ and Γᵀ for bf16
    # rows there; VICReg's Γ stays fp32); the N×N paths keep their fp32 Grams (whose fused
    # partial gives the loss)
    return {"pairwise": estimate_seconds(k, n, dtype, need_grad, round_grams=False)["gram"],
            "gram": estimate_seconds(n, k, dtype, need_grad, round_grams=loss == "barlow_twins",
                                     finish=1 if loss == "barlow_twins" else 2)["gram"]}


def _times_gamma(na: torch.Tensor, nb: torch.Tensor, gam: torch.Tensor, scale: float):
    """``scale·Ẑb Γᵀ`` and ``scale·Ẑa Γ`` (fp32 (N, k)) for the fp32 (k, k) ``Γ``, as
    ``rowmat_pair`` results (the distributed form's backward, whose ``Γ`` arrives from
    autograd; the local k×k path forms and rounds its own in one pass).  bf16 rows take
    ``Γ`` and ``Γᵀ`` rounded to bf16 into one (2, k, k) buffer (two copies; one launch, one
    native dot per tile), as eager autograd rounds ``∂L/∂C``; fp16/fp32 rows the fp32 ``Γ``
    and ``Γᵀ`` (two layouts: two launches)."""
    if rounds_operand(na.dtype):
        gam, gam_t = rounded(gam, gam.T, na.dtype)
    else:
        gam_t = gam.T
    return rowmat_pair((nb, gam, nb, None, None), (na, gam_t, na, None, None),
                       scale, 0.0, 0.0, False, True)


def barlow_twins_forward(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float,
                         algorithm: str, need_grad: bool):
    """The body of :func:`barlow_twins_loss_fwd` (a plain function)."""
    n, k = z_a.shape
    if algorithm == "auto":
        algorithm = choose_algorithm(n, k, z_a.dtype, need_grad, z_a.device)
    elif algorithm not in ("pairwise", "gram"):
        raise ValueError(f"algorithm must be 'auto', 'pairwise' or 'gram', got {algorithm!r}")
    lam = float(lambda_param)
    na, nb, stats = col_stats(z_a, z_b, True, BN_EPS, transposed=algorithm == "pairwise")
    ga = gb = None
    if algorithm == "gram":
        if gram_backend("cross_gram", na) == "cublas":
            part = cross_gram(na, nb).view(1, 1, k, k)
        else:
            part = cross_gram_partials(na, nb)[0].unsqueeze(0)
        # one pass over C = Σ slices / N: per tile Σ_{i≠j} C_ij² and Σ_i (1 - C_ii)² (the
        # loss, from them in one launch) and Γ = ∂L/∂C (off-diagonal 2λC_ij, diagonal
        # 2C_ii - 2); bf16 rows take Γ and Γᵀ rounded to bf16 (one buffer: one rowmat_pair
        # launch, one native dot per tile), as eager autograd rounds ∂L/∂C; fp16/fp32 rows
        # the fp32 Γ, in place, and its transposed view (two layouts: two launches)
        half = rounds_operand(na.dtype)
        sq, gam = gram_finish(part, scale=1.0 / n, mul=2.0 * lam, diag="barlow",
                              need_grad=need_grad,
                              out_dtype=na.dtype if half else torch.float32, transpose=half)
        loss = combine(sq[:, 1], 1.0, sq[:, 0:1], lam)
        if need_grad:
            gam_t = gam[1] if half else gam[0].T
            # Ẑb Γᵀ / N and Ẑa Γ / N (rowmat's X Gᵀ; raw: their partials are not needed)
            _, (ga, gb) = rowmat_pair((nb, gam[0], nb, None, None), (na, gam_t, na, None, None),
                                      1.0 / n, 0.0, 0.0, False, True, raw=True)
        part = gam = None  # free the k×k matrices before pass 3
    else:
        # C_ii = Σ ẑa∘ẑb / N (rowmat's d) and base = Σ (1 - C_ii)² - λ Σ C_ii², one launch
        diag, base = col_terms(stats, n, False, lam=lam)
        diag = diag[0]
        na_t, nb_t = na.T, nb.T  # contiguous (k, N)
        if need_grad:
            g_a, g_b = gram_pair(na_t, nb_t)  # Ẑa Ẑaᵀ, Ẑb Ẑbᵀ (N×N), one launch
            coef = (2.0 * lam / (n * n), -2.0 / n, (2.0 - 2.0 * lam) / n)
            # written through transposed views: the gradients come out contiguous (N, k),
            # what the in-place Jacobian pass below needs
            ga = torch.empty((n, k), dtype=torch.float32, device=z_a.device)
            gb = torch.empty((n, k), dtype=torch.float32, device=z_a.device)
            part, _ = rowmat_pair((na_t, g_b, nb_t, diag, ga.T),
                                  (nb_t, g_a, na_t, diag, gb.T), *coef, False, True, raw=True)
            del g_b, g_a
            # base + λ/N² Σ ẑaᵀ (Ẑb Ẑbᵀ) ẑa (the first view's Σ x∘q partials), one launch
            loss = combine(base.view(1), 1.0, part[0, :, 0:1], lam / (n * n))
        else:
            g_a = gram(na_t)  # Ẑa Ẑaᵀ (N×N)
            # base + λ/N² <G_a, Ẑb Ẑbᵀ>_F from gram_dot's partials, one launch
            part = gram_dot(nb_t, g_a, raw=True)
            del g_a
            loss = combine(base.view(1), 1.0, part, lam / (n * n))
    if not need_grad:
        return (loss, z_a.new_empty((0,), dtype=torch.float32),
                z_a.new_empty((0,), dtype=torch.float32))
    ga, gb = col_stats_backward(ga, gb, na, nb, z_a, z_b, stats, 0.0, in_place=True)
    return loss, ga, gb


@torch.library.custom_op("minc_kernels::barlow_twins_loss_fwd", mutates_args=())
def barlow_twins_loss_fwd(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float,
                          algorithm: str, need_grad: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, dL/dz_a, dL/dz_b)``: fp32 scalar and fp32 (N, k) gradients ((0,) without ``need_grad``)."""
    return barlow_twins_forward(z_a, z_b, lambda_param, algorithm, need_grad)


@barlow_twins_loss_fwd.register_fake
def _barlow_twins_loss_fwd_fake(z_a, z_b, lambda_param, algorithm, need_grad):
    shape = tuple(z_a.shape) if need_grad else (0,)
    return (z_a.new_empty((), dtype=torch.float32), z_a.new_empty(shape, dtype=torch.float32),
            z_a.new_empty(shape, dtype=torch.float32))


_barlow_twins_loss = register_grad_in_forward(
    barlow_twins_loss_fwd, need_grad_index=4, grad_inputs=(0, 1),
    what="minc_kernels::barlow_twins_loss_fwd", body=barlow_twins_forward)


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float,
                      algorithm: str) -> torch.Tensor:
    """Fp32 scalar Barlow Twins loss (docs/math.md §7), differentiable wrt ``z_a`` and ``z_b``."""
    need_grad = torch.is_grad_enabled() and (z_a.requires_grad or z_b.requires_grad)
    loss, _, _ = _barlow_twins_loss(z_a, z_b, float(lambda_param), algorithm, need_grad)
    return loss


# ----------------------------------------------------------------------------- distributed form
# lightly's gather_distributed=True all-reduces each rank's C (docs/math.md §7): the rank's
# Ẑaᵀ Ẑb is a differentiable op of its own (real backward: the all-reduce's gradient arrives
# as dL/dC only after the collective, so it cannot be formed in the forward).


@torch.library.custom_op("minc_kernels::barlow_twins_cross_corr", mutates_args=())
def barlow_twins_cross_corr(z_a: torch.Tensor, z_b: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Ẑaᵀ Ẑb, Ẑa, Ẑb, stats)``: the fp32 (k, k) cross-product of the standardised views
    (not divided by N) and what its backward needs (non-differentiable)."""
    na, nb, stats = col_stats(z_a, z_b, True, BN_EPS, transposed=False)
    return cross_gram(na, nb), na, nb, stats


@barlow_twins_cross_corr.register_fake
def _barlow_twins_cross_corr_fake(z_a, z_b):
    k = z_a.shape[1]
    return (z_a.new_empty((k, k), dtype=torch.float32),
            torch.empty_like(z_a, memory_format=torch.contiguous_format),
            torch.empty_like(z_b, memory_format=torch.contiguous_format),
            z_a.new_empty((10, k), dtype=torch.float32))


@torch.library.custom_op("minc_kernels::barlow_twins_cross_corr_backward", mutates_args=())
def barlow_twins_cross_corr_backward(grad_c: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor,
                                     na: torch.Tensor, nb: torch.Tensor, stats: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``dL/dz_a, dL/dz_b`` (input dtypes) from ``dL/d(Ẑaᵀ Ẑb)``: ``Ẑb Gᵀ``, ``Ẑa G``
    (:func:`rowmat_pair`), then the standardisation's Jacobian."""
    (_, _, dna), (_, _, dnb) = _times_gamma(na, nb, grad_c.float(), 1.0)
    ga, gb = col_stats_backward(dna, dnb, na, nb, z_a, z_b, stats, 0.0)
    return ga.to(z_a.dtype), gb.to(z_b.dtype)


@barlow_twins_cross_corr_backward.register_fake
def _barlow_twins_cross_corr_backward_fake(grad_c, z_a, z_b, na, nb, stats):
    return torch.empty_like(z_a), torch.empty_like(z_b)


def _cross_corr_setup(ctx, inputs, output):
    _, na, nb, stats = output
    ctx.mark_non_differentiable(na, nb, stats)
    ctx.save_for_backward(inputs[0], inputs[1], na, nb, stats)


def _cross_corr_backward(ctx, grad_c, *_):
    z_a, z_b, na, nb, stats = ctx.saved_tensors
    if grad_c is None:
        return None, None
    return barlow_twins_cross_corr_backward(grad_c, z_a, z_b, na, nb, stats)


barlow_twins_cross_corr.register_autograd(_cross_corr_backward, setup_context=_cross_corr_setup)


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """``Ẑaᵀ Ẑb`` (fp32 (k, k), not divided by N), differentiable wrt ``z_a`` and ``z_b``
    (first derivatives)."""
    c, _, _, _ = barlow_twins_cross_corr(z_a, z_b)
    return c
