"""Public functional API: validate, then run the Triton kernels or the eager reference.

Every loss returns a float32 scalar whatever the input dtype (matmuls run in the
input's dtype, reductions in float32).  The backend is chosen per call, see
:mod:`minc_kernels._backend`.
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import resolve
from ._validation import (
    check_choice,
    check_moment,
    check_nonnegative,
    check_pair,
    check_positive,
    check_features,
)

__all__ = [
    "spectral_contrastive_loss",
    "minc_loss",
    "minc_moment_sum",
    "mio_loss",
]

SPECTRAL_ALGORITHMS = ("auto", "pairwise", "gram")
MINC_ORDERINGS = ("standard", "gha")


def spectral_contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    mu: float = 1.0,
    clip: bool = True,
    algorithm: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """Spectral contrastive loss of (B, k) views ``z1``, ``z2`` (SPEC §1); B >= 2.

    ``L = ( -(2/B) Σ_i z1_i·z2_i + 1/(B(B-1)) Σ_{i≠j} (z1_i·z2_j)^2 ) / mu`` after clipping
    each row's norm to at most ``sqrt(mu)`` (``clip=True``).  ``algorithm`` picks the
    pairwise-tile or feature-Gram evaluation (``"auto"``: a cost model); both are exact.
    """
    check_pair("z1", z1, "z2", z2, min_batch=2)
    mu = check_positive("mu", mu)
    check_choice("algorithm", algorithm, SPECTRAL_ALGORITHMS)
    op = resolve(backend, "spectral", z1)
    if op is None:
        return reference.spectral_loss(z1, z2, mu=mu, clip=bool(clip), algorithm=algorithm)
    return op.spectral_loss(z1, z2, mu, bool(clip), algorithm)


def minc_loss(
    p: torch.Tensor,
    t: torch.Tensor,
    moment: torch.Tensor,
    ordering: str = "standard",
    backend: str | None = None,
) -> torch.Tensor:
    """MINC bilinear loss for a given second-moment matrix ``moment`` (k×k, symmetric).

    ``L = (1/B) Σ_i [-2 p_i·t_i + p_iᵀ M p_i]``, ``t`` and ``M`` stop-gradient;
    ``dL/dp_i = (2/B)(M p_i - t_i)``, or with ``ordering="gha"`` ``(2/B)(LT(M) p_i - t_i)``.
    Stateless: :class:`minc_kernels.MINCLoss` owns and updates ``M``.
    """
    check_pair("p", p, "t", t, min_batch=1)
    check_moment("moment", moment, p.shape[1], p.device)
    check_choice("ordering", ordering, MINC_ORDERINGS)
    op = resolve(backend, "minc", p)
    if op is None:
        return reference.minc_loss(p, t, moment, ordering=ordering)
    return op.minc_loss(p, t.detach(), moment.detach().float(), ordering)


def minc_moment_sum(t: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` of a (B, k) batch as a float32 (k, k) matrix, no gradient."""
    check_features("t", t, min_batch=1)
    op = resolve(backend, "minc", t)
    if op is None:
        return reference.minc_batch_moment_sum(t)
    return op.moment_sum(t.detach())


def mio_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    pos_temperature: float = 0.5,
    neg_temperature: float = 0.5,
    lambda_l2: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """MIO binary contrastive loss of (B, k) views (SPEC §3); any B >= 2.

    ``mean_pos softplus(-S/τp) + mean_neg softplus(S/τn) + λ·mse(ẑ1, ẑ2)`` over
    ``S = Z Zᵀ`` of the normalised, stacked views (2B rows).
    """
    check_pair("z1", z1, "z2", z2, min_batch=2)
    pos_temperature = check_positive("pos_temperature", pos_temperature)
    neg_temperature = check_positive("neg_temperature", neg_temperature)
    lambda_l2 = check_nonnegative("lambda_l2", lambda_l2)
    op = resolve(backend, "mio", z1)
    if op is None:
        return reference.mio_loss(z1, z2, pos_temperature, neg_temperature, lambda_l2)
    return op.mio_loss(z1, z2, pos_temperature, neg_temperature, lambda_l2)
