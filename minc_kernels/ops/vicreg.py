"""VICReg launchers and ``torch.library`` op (docs/math.md §8), on the shared Gram layer.

Op ``minc_kernels::vicreg_loss_fwd(z_a, z_b, lambda_param, mu_param, nu_param, eps,
algorithm, need_grad) -> (loss, grad_z_a, grad_z_b)``: the fp32 loss and, with
``need_grad``, the fp32 gradients for a unit upstream gradient (empty otherwise); autograd by
:func:`~minc_kernels.ops._grad_in_forward.register_grad_in_forward`.  ``algorithm`` is
``"pairwise"`` (N×N), ``"gram"`` (k×k) or ``"auto"``, resolved inside the op by
:func:`minc_kernels.ops.barlow_twins.choose_algorithm` (VICReg's measured table where one
answers, else the spectral cost model's Gram-path estimate of both orientations; the launches
are the same kinds as Barlow Twins').

Passes:

1. :func:`~minc_kernels.ops.gram.col_stats` (one kernel, both views): column means, the
   centred ``Z_c`` (storage dtype; stored (k, N) for the N×N path), ``Σ_n (z_n - m)²``
   (fp32, the unbiased variance's numerator), ``Σ_n zc_n²`` of the rounded ``Z_c`` and the
   invariance sum ``Σ (z_a - z_b)²``.  Then :func:`~minc_kernels.ops.gram.col_terms` (one
   program): the variance hinge, its derivative ``h`` per view, the invariance term and
   (N×N) the Gram diagonal's share, i.e. the loss without its Frobenius terms (one launch
   where 25-30 small torch ops were).
2. Per view (both views in one launch per Gram-layer pass while their matrices are small),
   ``"gram"``: ``G = Z_cᵀ Z_c`` (k×k fp32 row-slice partials, written), then one pass
   (:func:`~minc_kernels.ops.gram.gram_finish`): the slices summed, ``Σ_{i≠j} G_ij²`` per
   tile and, with a gradient, ``Γ = α offdiag(G) + diag(h)`` in place; then ``Z_c Γ``
   (:func:`rowmat`).
   ``"pairwise"``: ``H = Z_c Z_cᵀ`` (N×N fp32, written); without a gradient ``‖H‖_F²``;
   with one ``α Z_cᵀ H + diag(h - α Σ zc²) Z_cᵀ`` by ``rowmat`` on the transposed view,
   whose fused partial is ``‖H‖_F²``.
3. :func:`~minc_kernels.ops.gram.col_stats_backward`: the centring's Jacobian and the
   invariance gradient ``±2λ(z_a - z_b)/(N k)`` in one pass.

Memory beyond tiles: one k×k (``"gram"``; its row slices where k is small enough for the
Gram's tiles alone to leave SMs idle) or N×N (``"pairwise"``) fp32 matrix per view
(written; reused in place for the gradient; freed once the view's gradient is formed; both
views' at once, formed and multiplied in one launch each, only while each is at most
``PAIR_MAX_BYTES``), centred copies of both views, fp32 gradients (which pass 3 overwrites
in place; measured: ``benchmarks/op_memory.py``).
Deterministic (no atomics).
"""
from __future__ import annotations

import torch

from ._grad_in_forward import register_grad_in_forward
from .gram import (col_stats, col_stats_backward, col_terms, combine, gram, gram_finish,
                   gram_pair, gram_slices, rowmat, rowmat_pair)
from .barlow_twins import choose_algorithm

__all__ = ["vicreg_loss", "vicreg_loss_fwd", "vicreg_forward"]


# Both views' k×k (or N×N) matrices in one launch only while they are small: a pair keeps
# both alive at once where one view at a time frees the first before forming the second.
# Below this size a call is bound by launches and host work (the pair saves two launches);
# above it, by the arithmetic, and the second matrix would be pure extra memory.
PAIR_MAX_BYTES = 16 << 20


def _cov_views(xcs: list[torch.Tensor], coefs: torch.Tensor, alpha: float, algorithm: str,
               need_grad: bool) -> tuple[torch.Tensor, list]:
    """``(Σ over the views of Σ_{i≠j} G_ij² (k×k) or ‖Z_c Z_cᵀ‖_F² (N×N), as partials for
    :func:`combine` — a 0-dim sum, or a (parts, 1 or 2) array —, [∂/∂Z_c or None per
    view])`` of
    one centred view or of two (docs/math.md §8), two in one launch per Gram-layer pass;
    ``coefs``: the views' rows of :func:`col_terms` (``h``, or ``h - α Σ zc²``)."""
    pair = len(xcs) == 2
    if algorithm == "gram":
        # one pass over the Grams' row slices: summed, Σ_{i≠j} G_ij² per tile, and
        # Γ = α offdiag(G) + diag(h) in place (where a slice sum and six torch ops were)
        sq, gs = gram_finish(gram_slices(xcs), mul=alpha, diag="coef", coef=coefs,
                             need_grad=need_grad)
        off = sq[:, 0:1]
        if not need_grad:
            return off, [None] * len(xcs)
        views = [(xc, g, xc, None, None) for xc, g in zip(xcs, gs)]
        if pair:  # raw: the product's partials are not needed, so nor is their sum
            return off, rowmat_pair(*views, 1.0, 0.0, 0.0, False, True, raw=True)[1]
        return off, [rowmat(*views[0][:4], 1.0, 0.0, 0.0, False, True)[2]]
    xts = [xc.T for xc in xcs]  # contiguous (k, N)
    if not need_grad:  # ‖H‖_F²: off-diagonal and diagonal partials of one pass
        sq, _ = gram_finish(gram_slices(xts), need_grad=False)
        return sq, [None] * len(xcs)
    hhs = gram_pair(*xts) if pair else [gram(xts[0])]  # Z_c Z_cᵀ (N×N)
    # written through a transposed view: the gradient comes out contiguous (N, k), what the
    # in-place Jacobian pass needs
    grads = [torch.empty(xc.shape, dtype=torch.float32, device=xc.device) for xc in xcs]
    views = [(xt, hh, xt, coef, grad.T) for xt, hh, coef, grad in zip(xts, hhs, coefs, grads)]
    if pair:  # the fused partials, ‖H‖_F² per view: both views' Σ x∘q partials, unsummed
        part, _ = rowmat_pair(*views, alpha, 0.0, 1.0, False, True, raw=True)
        return part.view(-1, 2)[:, 0:1], grads
    got = rowmat(*views[0][:4], alpha, 0.0, 1.0, False, True, out=views[0][4])
    return got[0], grads


def vicreg_forward(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float, mu_param: float,
                   nu_param: float, eps: float, algorithm: str, need_grad: bool):
    """The body of :func:`vicreg_loss_fwd` (a plain function)."""
    if algorithm == "auto":
        algorithm = choose_algorithm(z_a.shape[0], z_a.shape[1], z_a.dtype, need_grad,
                                     z_a.device, loss="vicreg")
    elif algorithm not in ("pairwise", "gram"):
        raise ValueError(f"algorithm must be 'auto', 'pairwise' or 'gram', got {algorithm!r}")
    n, k = z_a.shape
    lam, mu, nu = float(lambda_param), float(mu_param), float(nu_param)
    pairwise = algorithm == "pairwise"
    xa, xb, stats = col_stats(z_a, z_b, False, 0.0, transposed=pairwise)
    alpha = 4.0 * nu / (k * (n - 1) ** 2)
    # invariance + variance hinge (+ the Gram diagonal, N×N) and each view's coefficients
    coef, base = col_terms(stats, n, True, pairwise, lam=lam, mu=mu, nu=nu, eps=eps,
                           alpha=alpha)
    m = k if algorithm == "gram" else n
    if 4 * m * m <= PAIR_MAX_BYTES:
        off, (gxa, gxb) = _cov_views([xa, xb], coef[:2], alpha, algorithm, need_grad)
    else:  # one view at a time: the first view's matrix is freed before the second's
        off_a, (gxa,) = _cov_views([xa], coef[:1], alpha, algorithm, need_grad)
        off_b, (gxb,) = _cov_views([xb], coef[1:2], alpha, algorithm, need_grad)
        off = torch.cat([off_a.reshape(-1, 1), off_b.reshape(-1, 1)])
    # base + ν/((N-1)² k) Σ off from the partials in one launch (where their sum and two
    # adds were)
    loss = combine(base.view(1), 1.0, off, nu / ((n - 1) ** 2 * k))
    if not need_grad:
        return (loss, z_a.new_empty((0,), dtype=torch.float32),
                z_a.new_empty((0,), dtype=torch.float32))
    ga, gb = col_stats_backward(gxa, gxb, None, None, z_a, z_b, stats, 2.0 * lam / (n * k),
                                in_place=True)
    return loss, ga, gb


@torch.library.custom_op("minc_kernels::vicreg_loss_fwd", mutates_args=())
def vicreg_loss_fwd(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float, mu_param: float,
                    nu_param: float, eps: float, algorithm: str, need_grad: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, dL/dz_a, dL/dz_b)``: fp32 scalar and fp32 (N, k) gradients ((0,) without ``need_grad``)."""
    return vicreg_forward(z_a, z_b, lambda_param, mu_param, nu_param, eps, algorithm, need_grad)


@vicreg_loss_fwd.register_fake
def _vicreg_loss_fwd_fake(z_a, z_b, lambda_param, mu_param, nu_param, eps, algorithm, need_grad):
    shape = tuple(z_a.shape) if need_grad else (0,)
    return (z_a.new_empty((), dtype=torch.float32), z_a.new_empty(shape, dtype=torch.float32),
            z_a.new_empty(shape, dtype=torch.float32))


_vicreg_loss = register_grad_in_forward(vicreg_loss_fwd, need_grad_index=7, grad_inputs=(0, 1),
                                        what="minc_kernels::vicreg_loss_fwd", body=vicreg_forward)


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float, mu_param: float,
                nu_param: float, eps: float, algorithm: str) -> torch.Tensor:
    """Fp32 scalar VICReg loss (docs/math.md §8), differentiable wrt ``z_a`` and ``z_b``."""
    need_grad = torch.is_grad_enabled() and (z_a.requires_grad or z_b.requires_grad)
    loss, _, _ = _vicreg_loss(z_a, z_b, float(lambda_param), float(mu_param),
                                 float(nu_param), float(eps), algorithm, need_grad)
    return loss
