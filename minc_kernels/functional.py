"""Public functional API: validate, then run the Triton kernels or the eager reference.

Every loss returns a float32 scalar whatever the input dtype (matmuls run in the
input's dtype, reductions in float32).  The backend is chosen per call, see
:mod:`minc_kernels._backend`.

The op modules import lazily on first use; TorchDynamo cannot trace that import, so
before calling these functions inside ``torch.compile(fullgraph=True)`` call
:func:`load_kernels` once (the loss modules do it in their constructors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed as D
from . import reference
from ._backend import preload, requested_backend, resolve
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
    "load_kernels",
]


def load_kernels(backend: str | None = None) -> None:
    """Import the Triton ops now (outside any compiled region) if ``backend`` may use them.

    A no-op for ``backend="reference"`` and on machines without CUDA (unless
    ``TRITON_INTERPRET=1``); an unavailable op is remembered and reported when requested.
    """
    for op in ("spectral", "minc", "mio"):
        preload(op, backend)

SPECTRAL_ALGORITHMS = ("auto", "pairwise", "gram")
SPECTRAL_DIST_COMMS = ("auto", "gram", "gather")
MINC_ORDERINGS = ("standard", "gha")


def spectral_contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    mu: float = 1.0,
    clip: bool = True,
    algorithm: str = "auto",
    backend: str | None = None,
    gather_distributed: bool = False,
    dist_comm: str = "auto",
) -> torch.Tensor:
    """Spectral contrastive loss of (B, k) views ``z1``, ``z2`` (SPEC §1); B >= 2.

    ``L = ( -(2/B) Σ_i z1_i·z2_i + 1/(B(B-1)) Σ_{i≠j} (z1_i·z2_j)^2 ) / mu`` after clipping
    each row's norm to at most ``sqrt(mu)`` (``clip=True``).  ``algorithm`` picks the
    pairwise-tile or feature-Gram evaluation (``"auto"``: a cost model); both are exact.

    ``gather_distributed=True`` (SPEC §5), inside an initialised process group of W > 1
    ranks: ``L`` of the *global* batch (B = Σ_r B_r, every cross-rank pair included),
    the same value on every rank, with gradients such that DDP's averaging applies
    exactly the single-process gradient.  ``dist_comm``: ``"gram"`` all-reduces the
    k×k Grams ``Z1ᵀZ1, Z2ᵀZ2`` and three scalars; ``"gather"`` all-gathers the (B, k)
    features and evaluates the loss on them; ``"auto"`` picks the fewer bytes
    (:func:`spectral_dist_comm_choice`, after a size exchange).  A no-op otherwise.
    """
    gather = bool(gather_distributed) and D.is_distributed()
    check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
    mu = check_positive("mu", mu)
    check_choice("algorithm", algorithm, SPECTRAL_ALGORITHMS)
    check_choice("dist_comm", dist_comm, SPECTRAL_DIST_COMMS)
    if gather:
        return _spectral_distributed(z1, z2, mu, bool(clip), algorithm, backend, dist_comm)
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


def minc_moment_sum(t: torch.Tensor, backend: str | None = None,
                    gather_distributed: bool = False) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` of a (B, k) batch as a float32 (k, k) matrix, no gradient.

    ``gather_distributed=True``: the sum over the global batch (an all-reduce of the
    k×k local sums; divide by the global row count, e.g. ``D.all_reduce_sum`` of the
    local count, to get C).  :class:`minc_kernels.MINCLoss` packs both in one all-reduce.
    """
    check_features("t", t, min_batch=1)
    op = resolve(backend, "minc", t)
    if op is None:
        s = reference.minc_batch_moment_sum(t)
    else:
        s = op.moment_sum(t.detach())
    if gather_distributed:
        with torch.no_grad():
            s = D.all_reduce_sum(s)
    return s


def mio_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    pos_temperature: float = 0.5,
    neg_temperature: float = 0.5,
    lambda_l2: float = 1.0,
    backend: str | None = None,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """MIO binary contrastive loss of (B, k) views (SPEC §3); any B >= 2.

    ``mean_pos softplus(-S/τp) + mean_neg softplus(S/τn) + λ·mse(ẑ1, ẑ2)`` over
    ``S = Z Zᵀ`` of the normalised, stacked views (2B rows).

    ``gather_distributed=True`` (SPEC §5), inside a process group of W > 1 ranks: the
    loss of the *global* batch (B = Σ_r B_r, all pairs across ranks), the same value on
    every rank; each rank evaluates its 2B_r local rows against the 2B gathered columns
    and the three partial sums are all-reduced, so DDP's averaging applies exactly the
    single-process gradient.  A no-op otherwise.
    """
    gather = bool(gather_distributed) and D.is_distributed()
    check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
    pos_temperature = check_positive("pos_temperature", pos_temperature)
    neg_temperature = check_positive("neg_temperature", neg_temperature)
    lambda_l2 = check_nonnegative("lambda_l2", lambda_l2)
    if gather:
        requested_backend(backend)  # validated; the local-rows form is composed in eager PyTorch
        return _mio_distributed(z1, z2, pos_temperature, neg_temperature, lambda_l2)
    op = resolve(backend, "mio", z1)
    if op is None:
        return reference.mio_loss(z1, z2, pos_temperature, neg_temperature, lambda_l2)
    return op.mio_loss(z1, z2, pos_temperature, neg_temperature, lambda_l2)


# --------------------------------------------------------------------------- distributed (SPEC §5)
def spectral_dist_comm_choice(k: int, global_batch: int, feature_bytes: int,
                              acc_bytes: int = 4) -> str:
    """``"gram"`` or ``"gather"``: the distributed spectral communication with fewer bytes per step.

    Per rank, forward + backward, ring collectives, up to the common factor (W-1)/W:
    ``"gram"`` all-reduces ``2k² + 3`` accumulator elements twice (forward values, backward
    gradients) at 2x for an all-reduce: ``4·(2k²+3)·acc_bytes``; ``"gather"`` all-gathers the
    ``B×2k`` features and reduce-scatters their gradients: ``2·2Bk·feature_bytes``.
    Roughly: the Grams win when ``k < B·feature_bytes / (2·acc_bytes)``.
    """
    gram = 4 * (2 * k * k + 3) * acc_bytes
    gather = 2 * 2 * global_batch * k * feature_bytes
    return "gram" if gram <= gather else "gather"


def _spectral_distributed(z1, z2, mu, clip, algorithm, backend, dist_comm):
    """Global-batch spectral loss, identical on every rank (module docstring of ``distributed``)."""
    requested_backend(backend)
    k = z1.shape[1]
    sizes = None
    if dist_comm == "auto":
        sizes = D.gather_sizes(z1.shape[0], z1.device)
        acc_bytes = 8 if z1.dtype == torch.float64 else 4
        dist_comm = spectral_dist_comm_choice(k, sum(sizes), z1.element_size(), acc_bytes)
    if dist_comm == "gather":
        # One gather of [z1 | z2]; clipping is per row, so clipping after the gather is the same.
        zg = D.all_gather(torch.cat([z1, z2], dim=1), sizes=sizes)
        return spectral_contrastive_loss(zg[:, :k].contiguous(), zg[:, k:].contiguous(), mu, clip,
                                         algorithm, backend)
    # "gram": everything the loss needs is a sum over rows; all-reduce those sums (packed).
    if clip:
        z1 = reference.clip_rows(z1, mu)
        z2 = reference.clip_rows(z2, mu)
    g1 = reference.acc(z1.T @ z1)
    g2 = reference.acc(z2.T @ z2)
    dots = (reference.acc(z1) * reference.acc(z2)).sum(dim=1)
    count = torch.full((1,), float(z1.shape[0]), dtype=g1.dtype, device=g1.device)
    packed = torch.cat([g1.reshape(-1), g2.reshape(-1), dots.sum().reshape(1),
                        dots.pow(2).sum().reshape(1), count])
    red = D.all_reduce_sum(packed)
    kk = k * k
    pos, diag_sq, b = red[2 * kk], red[2 * kk + 1], red[2 * kk + 2].detach()
    off = (red[:kk] * red[kk:2 * kk]).sum() - diag_sq
    return (-2.0 * pos / b + off / (b * (b - 1.0))) / mu


def _mio_distributed(z1, z2, pos_temperature, neg_temperature, lambda_l2):
    """Global-batch MIO loss: local rows × gathered columns, partial sums all-reduced."""
    b_local, k = z1.shape
    sizes = D.gather_sizes(b_local, z1.device)
    b = sum(sizes)
    n = 2 * b
    offset = sum(sizes[: D.rank()])
    zh1 = F.normalize(z1, dim=1, eps=1e-12)
    zh2 = F.normalize(z2, dim=1, eps=1e-12)
    rows = torch.cat([zh1, zh2], dim=0)                                 # (2B_r, k), local
    gathered = D.all_gather(torch.cat([zh1, zh2], dim=1), sizes=sizes)  # (B, 2k), global
    cols = torch.cat([gathered[:, :k], gathered[:, k:]], dim=0)         # (2B, k) = [ẑ1; ẑ2]
    s = reference.acc(rows @ cols.T)                                    # (2B_r, 2B)
    local = torch.arange(b_local, device=z1.device)
    own = torch.cat([offset + local, b + offset + local])               # global index of each row
    partner = (own + b) % n
    row_idx = torch.arange(2 * b_local, device=z1.device)
    pos = torch.zeros_like(s, dtype=torch.bool)
    pos[row_idx, partner] = True
    neg = ~pos
    neg[row_idx, own] = False
    sums = torch.stack([
        F.softplus(-s[pos] / pos_temperature).sum(),
        F.softplus(s[neg] / neg_temperature).sum(),
        (reference.acc(zh1) - reference.acc(zh2)).pow(2).sum(),
    ])
    red = D.all_reduce_sum(sums)
    return red[0] / n + red[1] / (n * (n - 2)) + lambda_l2 * red[2] / (b * k)
