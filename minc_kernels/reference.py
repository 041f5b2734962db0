"""Eager PyTorch references of SPEC.md: the one oracle for tests, benchmarks and the CPU path.

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
    "minc_loss",
    "minc_batch_moment_sum",
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
    """HaoChen et al. spectral contrastive loss (SPEC §1), float32 scalar.

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
def minc_batch_moment_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` (k×k, float32, no gradient)."""
    t = acc(t.detach())
    return t.T @ t


def minc_ema_moment(
    moment: torch.Tensor, batch_moment: torch.Tensor, beta: float, num_updates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step of the raw moment and its bias-corrected value (SPEC §2 step 2).

    ``moment`` is the raw EMA after ``num_updates`` updates; returns
    ``(raw_new, raw_new / (1 - beta^(num_updates+1)))``.  With ``beta == 0`` both equal C.
    """
    raw = beta * moment + (1.0 - beta) * batch_moment
    n = num_updates + 1
    corr = 1.0 - beta**n
    return raw, raw / corr


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


def minc_loss(
    p: torch.Tensor, t: torch.Tensor, moment: torch.Tensor, ordering: str = "standard"
) -> torch.Tensor:
    """MINC bilinear loss ``(1/B) Σ_i [-2 p_i·t_i + p_iᵀ M p_i]`` (SPEC §2 step 3), float32.

    ``t`` and ``moment`` are stop-gradient.  ``M`` must be symmetric (it is, by
    construction), so ``dL/dp_i = (2/B)(M p_i - t_i)``; ``ordering="gha"`` uses
    ``LT(M)`` (lower triangle, diagonal included) in the gradient instead.
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


# --------------------------------------------------------------------------- MIO
def mio_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    pos_temperature: float = 0.5,
    neg_temperature: float = 0.5,
    lambda_l2: float = 1.0,
) -> torch.Tensor:
    """MIO binary-contrastive loss (SPEC §3), any B >= 2, float32 scalar.

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
    pos = torch.zeros(n, n, dtype=torch.bool, device=z.device)
    pos[idx, partner] = True
    neg = ~pos
    neg.fill_diagonal_(False)
    l_pos = F.softplus(-s[pos] / pos_temperature).mean()
    l_neg = F.softplus(s[neg] / neg_temperature).mean()
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
