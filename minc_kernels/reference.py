"""Eager PyTorch references of ``docs/math.md``: the one oracle for tests, benchmarks and the CPU path.

Everything here is plain differentiable PyTorch (except the ``gha`` custom backward,
which is not the gradient of a scalar).  No input validation happens here; the
public functions in :mod:`minc_kernels.functional` validate before calling in.

Precision convention (shared by every backend): matmuls run in the input's storage
dtype as eager PyTorch would; reductions and the returned loss are float32 (float64
for float64 inputs, so that gradcheck can run on the references).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "clip_rows",
    "spectral_loss",
    "spectral_pairwise_term",
    "spectral_gram_term",
    "MINC_FEATURE_NORMS",
    "minc_features",
    "minc_loss",
    "minc_batch_moment_sum",
    "minc_moment_update",
    "minc_moment_update_",
    "minc_corrected_moment",
    "minc_ema_moment",
    "mio_loss",
    "ema_update_",
    "cosine_momentum",
]



def acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its accumulation dtype: float32 for half types and float32, float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


# --------------------------------------------------------------------------- spectral
def clip_rows(z: torch.Tensor, mu: float) -> torch.Tensor:
    """Rows with ``||z_i|| >= sqrt(mu)`` rescaled to norm exactly ``sqrt(mu)``; others unchanged.

    Differentiable: the rescaling's Jacobian is part of the graph.
    """
    r = math.sqrt(mu)
    norm = acc(z).norm(dim=1, keepdim=True)
    # clamp_min keeps the unused branch finite for all-zero rows (norm 0 < r always).
    scale = torch.where(norm >= r, r / norm.clamp_min(1e-30), torch.ones_like(norm))
    return (acc(z) * scale).to(z.dtype)


def spectral_pairwise_term(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``Σ_{i≠j} (z1_i·z2_j)^2`` through the B×B matrix ``S = Z1 Z2ᵀ`` (O(B²k))."""
    s = acc(z1 @ z2.T)
    off = s.pow(2).sum() - torch.diagonal(s).pow(2).sum()
    return off


def spectral_gram_term(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``Σ_{i≠j} (z1_i·z2_j)^2 = <Z1ᵀZ1, Z2ᵀZ2>_F - Σ_i (z1_i·z2_i)^2`` (O(Bk²))."""
    g1 = acc(z1.T @ z1)
    g2 = acc(z2.T @ z2)
    diag = (acc(z1) * acc(z2)).sum(dim=1)
    return (g1 * g2).sum() - diag.pow(2).sum()


def spectral_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    mu: float = 1.0,
    clip: bool = True,
    algorithm: str = "auto",
) -> torch.Tensor:
    """HaoChen et al. spectral contrastive loss (docs/math.md §1), float32 scalar.

    ``L = ( -(2/B) Σ_i z1_i·z2_i + 1/(B(B-1)) Σ_{i≠j} (z1_i·z2_j)^2 ) / mu`` after
    per-row norm clipping to ``sqrt(mu)`` (``clip=True``).
    ``algorithm``: ``"pairwise"`` (B×B matrix), ``"gram"`` (k×k Grams) or ``"auto"``
    (the cheaper one by flop count: B²k vs 2Bk²).
    """
    b, k = z1.shape
    if clip:
        z1 = clip_rows(z1, mu)
        z2 = clip_rows(z2, mu)
    if algorithm == "auto":
        algorithm = "pairwise" if b <= 2 * k else "gram"
    if algorithm == "pairwise":
        off = spectral_pairwise_term(z1, z2)
    elif algorithm == "gram":
        off = spectral_gram_term(z1, z2)
    else:
        raise ValueError(f"algorithm must be 'auto', 'pairwise' or 'gram', got {algorithm!r}")
    pos = (acc(z1) * acc(z2)).sum()
    return (-2.0 / b * pos + off / (b * (b - 1))) / mu


# --------------------------------------------------------------------------- MINC
MINC_FEATURE_NORMS = ("l2", "clip", "none")


def minc_features(x: torch.Tensor, feature_norm: str = "none", mu: float = 1.0,
                  scale: float = 1.0) -> torch.Tensor:
    """The per-row map MINC applies to both ``p`` and ``t`` before the moment and the loss.

    ``"l2"``: ``s·x_i/max(‖x_i‖, 1e-12)``; ``"clip"``: ``s·x_i·min(1, √μ/‖x_i‖)``
    (:func:`clip_rows`); ``"none"``: ``s·x_i``.  ``s = scale``.  Differentiable (the map's
    Jacobian is part of the graph); the output keeps ``x``'s dtype.
    """
    if feature_norm == "l2":
        x = F.normalize(x, dim=1, eps=1e-12)
    elif feature_norm == "clip":
        x = clip_rows(x, mu)
    elif feature_norm != "none":
        raise ValueError(f"feature_norm must be one of {MINC_FEATURE_NORMS}, got {feature_norm!r}")
    return x if scale == 1.0 else x * scale


def minc_loss_divisor(feature_norm: str, mu: float) -> float:
    """``μ`` for ``"clip"`` (the loss is divided by μ as the spectral loss is), else 1."""
    return float(mu) if feature_norm == "clip" else 1.0


def minc_batch_moment_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` (k×k, float32, no gradient)."""
    t = acc(t.detach())
    return t.T @ t


def minc_moment_update(moment: torch.Tensor, batch_moment: torch.Tensor, beta: float) -> torch.Tensor:
    """One EMA step of the raw moment: ``β M + (1-β) C`` (a new tensor; no gradient)."""
    dtype = torch.promote_types(moment.dtype, batch_moment.dtype)
    return torch.lerp(moment.to(dtype), batch_moment.to(dtype), 1.0 - beta)


def minc_moment_update_(moment: torch.Tensor, batch_moment: torch.Tensor, beta: float) -> torch.Tensor:
    """:func:`minc_moment_update` in place on ``moment`` (kept in its dtype): what MINCLoss
    runs.  Neither argument carries gradient (``batch_moment`` comes from detached targets)."""
    return moment.lerp_(batch_moment.to(moment.dtype), 1.0 - beta)


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: every entry of ``x`` is finite, decided on the device.

    ``(x·0).sum() == 0`` exactly when no entry is NaN/Inf (``inf·0`` and ``nan·0`` are NaN,
    a finite ``x·0`` is 0 and a sum of zeros is 0); three cheap ops instead of the five
    of ``isfinite(x).all()``, and no sum of ``x`` that could overflow.
    """
    return (x * 0).sum() == 0


def minc_corrected_moment(moment: torch.Tensor, beta: float, num_updates) -> torch.Tensor:
    """The bias-corrected moment ``M / (1 - β^n)`` after ``n = num_updates`` EMA steps.

    ``num_updates`` may be an int or a 0-d tensor (then nothing leaves the device).
    ``1 - β^n`` is evaluated as ``-expm1(n log β)``, accurate in float32 for β near 1, and
    floored at its first-step value ``1 - β``: for n >= 1 that changes nothing, and n = 0
    (never updated, M = 0) gives 0 rather than 0/0.
    """
    if beta == 0.0:
        return moment  # 1 - 0^n = 1 for n >= 1; M = 0 before the first update
    log_beta = math.log(beta)
    if isinstance(num_updates, torch.Tensor):
        return moment / torch.expm1(num_updates * log_beta).neg_().clamp_min_(1.0 - beta)
    return moment / max(-math.expm1(num_updates * log_beta), 1.0 - beta)


def minc_ema_moment(
    moment: torch.Tensor, batch_moment: torch.Tensor, beta: float, num_updates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step of the raw moment and its bias-corrected value (math.md §2 step 2).

    ``moment`` is the raw EMA after ``num_updates`` updates; returns
    ``(raw_new, raw_new / (1 - beta^(num_updates+1)))``.  With ``beta == 0`` both equal C.
    """
    raw = minc_moment_update(moment, batch_moment, beta)
    return raw, minc_corrected_moment(raw, beta, num_updates + 1)


class _MincGHA(torch.autograd.Function):
    """Bilinear MINC value, GHA gradient ``(2/B)(LT(M) p - t)`` (not a scalar's gradient)."""

    @staticmethod
    def forward(ctx, p, t, moment):
        pf, tf = acc(p), acc(t)
        b = p.shape[0]
        loss = (-2.0 * (pf * tf).sum() + ((pf @ moment) * pf).sum()) / b
        ctx.save_for_backward(p, t, moment)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        p, t, moment = ctx.saved_tensors
        b = p.shape[0]
        grad_p = None
        if ctx.needs_input_grad[0]:
            lt = torch.tril(moment)
            # (LT(M) p_i) for every row i is P LT(M)ᵀ.
            g = (2.0 / b) * (acc(p) @ lt.T - acc(t))
            grad_p = (grad_out * g).to(p.dtype)
        return grad_p, None, None


def minc_bilinear(p: torch.Tensor, t: torch.Tensor, moment: torch.Tensor,
                  ordering: str = "standard") -> torch.Tensor:
    """``(1/B) Σ_i [-2 p_i·t_i + p_iᵀ M p_i]`` on the (already mapped) features, float32.

    ``t`` and ``moment`` are stop-gradient; ``dL/dp_i = (2/B)(M p_i - t_i)`` (M symmetric),
    or ``(2/B)(LT(M) p_i - t_i)`` with ``ordering="gha"``.
    """
    t = t.detach()
    moment = moment.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
    if ordering == "gha":
        return _MincGHA.apply(p, t, moment)
    if ordering != "standard":
        raise ValueError(f"ordering must be 'standard' or 'gha', got {ordering!r}")
    pf, tf = acc(p), acc(t)
    b = p.shape[0]
    return (-2.0 * (pf * tf).sum() + ((pf @ moment) * pf).sum()) / b


def minc_loss(
    p: torch.Tensor, t: torch.Tensor, moment: torch.Tensor, ordering: str = "standard",
    feature_norm: str = "none", mu: float = 1.0, scale: float = 1.0,
) -> torch.Tensor:
    """MINC loss for a given moment (math.md §2 step 3 and "Scale"), float32.

    ``p̃ = φ(p)``, ``t̃ = φ(t)`` with ``φ`` = :func:`minc_features` (``feature_norm``,
    ``mu``, ``scale``), then ``L = (1/B) Σ_i [-2 p̃_i·t̃_i + p̃_iᵀ M p̃_i] / d`` with
    ``d = μ`` for ``"clip"``, else 1.  ``M`` must be the moment of the *mapped* targets.
    ``t`` and ``moment`` are stop-gradient; the gradient flows through ``φ(p)`` exactly.
    """
    t = t.detach()
    if feature_norm != "none" or scale != 1.0:
        p = minc_features(p, feature_norm, mu, scale)
        t = minc_features(t, feature_norm, mu, scale)
    loss = minc_bilinear(p, t, moment, ordering)
    div = minc_loss_divisor(feature_norm, mu)
    return loss if div == 1.0 else loss / div


# --------------------------------------------------------------------------- MIO
def mio_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    pos_temperature: float = 0.5,
    neg_temperature: float = 0.5,
    lambda_l2: float = 1.0,
) -> torch.Tensor:
    """MIO binary-contrastive loss (docs/math.md §3), any B >= 2, float32 scalar.

    ``Z = [ẑ1; ẑ2]``, ``S = Z Zᵀ``; ``mean_pos softplus(-S/τp) + mean_neg softplus(S/τn)``
    (positives (i, i±B), negatives every other off-diagonal entry) ``+ λ·mse(ẑ1, ẑ2)``.
    Materialises the 2B×2B matrix, as the authors' code does.
    """
    b = z1.shape[0]
    n = 2 * b
    zh1 = F.normalize(z1, dim=1, eps=1e-12)
    zh2 = F.normalize(z2, dim=1, eps=1e-12)
    z = torch.cat([zh1, zh2], dim=0)
    s = acc(z @ z.T)
    idx = torch.arange(n, device=z.device)
    partner = (idx + b) % n
    # Masks by torch.where, not boolean indexing: indexing needs the mask's values on the
    # host (nonzero), which meta/fake tensors and torch.compile cannot provide.
    pos = idx[None, :] == partner[:, None]
    neg = ~pos & (idx[None, :] != idx[:, None])
    zero = s.new_zeros(())
    l_pos = torch.where(pos, F.softplus(-s / pos_temperature), zero).sum() / n
    l_neg = torch.where(neg, F.softplus(s / neg_temperature), zero).sum() / (n * (n - 2))
    reg = F.mse_loss(acc(zh1), acc(zh2))
    return l_pos + l_neg + lambda_l2 * reg


# --------------------------------------------------------------------------- EMA
@torch.no_grad()
def ema_update_(
    targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], momentum: float
) -> None:
    """``target ← momentum·target + (1-momentum)·online`` for every pair, via ``_foreach_lerp_``.

    Online tensors of another floating dtype (bf16/fp16 into fp32 targets) are upcast first.
    """
    targets = list(targets)
    if not targets:
        return
    onlines = [o.to(t.dtype) if o.dtype != t.dtype else o for t, o in zip(targets, onlines)]
    torch._foreach_lerp_(targets, onlines, 1.0 - float(momentum))


def cosine_momentum(step: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    """BYOL schedule ``τ_k = final - (final - base)(cos(π k/K) + 1)/2``; ``base`` at 0, ``final`` at K."""
    if total <= 0:
        raise ValueError(f"total must be a positive number of steps, got {total}")
    frac = min(max(step, 0), total) / total
    return final - (final - base) * (math.cos(math.pi * frac) + 1.0) / 2.0
