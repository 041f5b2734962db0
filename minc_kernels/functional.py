"""Public functional API: validate at the boundary, choose the backend once, run.

Return dtype: float32 for float32/bfloat16/float16 inputs (matmuls in the input's dtype,
reductions in float32), float64 for float64 inputs.  The backend is validated by
:func:`minc_kernels._backend.requested_backend` and the kernel-or-reference choice made
once per call by :func:`minc_kernels._backend.select`.  The underscore functions below
take arguments that are already checked and a backend already chosen: the loss modules
call them directly, so nothing is validated twice.

The op modules import lazily on first use (the one lazy seam, see ``_backend``);
TorchDynamo cannot trace that import, so before calling these functions inside
``torch.compile(fullgraph=True)`` call :func:`load_kernels` once (the loss modules do it
in their constructors).
"""
from __future__ import annotations

from types import ModuleType
from typing import Sequence

import torch
import torch.nn.functional as F

from . import distributed as D
from . import reference
from .ops.mio_cpu import mio_loss_blocked  # plain torch (no Triton): imported eagerly, Dynamo-traceable
from ._backend import OP_NAMES, preload, requested_backend, select
from ._validation import (
    check_choice,
    check_features,
    check_moment,
    check_nonnegative,
    check_pair,
    check_positive,
)

__all__ = [
    "spectral_contrastive_loss",
    "minc_loss",
    "minc_moment_sum",
    "mio_loss",
    "load_kernels",
]

SPECTRAL_ALGORITHMS = ("auto", "pairwise", "gram")
SPECTRAL_DIST_COMMS = ("auto", "gram", "gather")
MINC_ORDERINGS = ("standard", "gha")
MINC_FEATURE_NORMS = reference.MINC_FEATURE_NORMS


def load_kernels(backend: str | None = None) -> None:
    """Import the Triton ops now (outside any compiled region) if ``backend`` may use them.

    A no-op for ``backend="reference"`` and on machines without CUDA (unless
    ``TRITON_INTERPRET=1``); an unavailable op is remembered and reported when requested.
    """
    choice = requested_backend(backend)
    for op in OP_NAMES:
        preload(op, choice)


# --------------------------------------------------------------------------- spectral
def check_spectral_config(choice: str, gather_distributed: bool, dist_comm: str) -> None:
    """An explicit ``backend="triton"`` must be honoured: the distributed ``"gram"``
    communication is composed in eager PyTorch, so that combination is refused."""
    if choice == "triton" and gather_distributed and dist_comm == "gram":
        raise ValueError("backend='triton' cannot be honoured with gather_distributed=True and "
                         "dist_comm='gram' (the all-reduced Gram form is composed in eager "
                         "PyTorch); use dist_comm='gather' (or 'auto', which then gathers) or "
                         "backend='auto'")


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
    """Spectral contrastive loss of (B, k) views ``z1``, ``z2`` (docs/math.md §1); B >= 2.

    ``L = ( -(2/B) Σ_i z1_i·z2_i + 1/(B(B-1)) Σ_{i≠j} (z1_i·z2_j)^2 ) / mu`` after clipping
    each row's norm to at most ``sqrt(mu)`` (``clip=True``).  ``algorithm`` picks the
    pairwise-tile or feature-Gram evaluation (``"auto"``: a cost model); both are exact.

    ``gather_distributed=True`` (docs/math.md §5), inside an initialised process group of
    W > 1 ranks: ``L`` of the *global* batch (B = Σ_r B_r, every cross-rank pair included),
    the same value on every rank, with gradients such that DDP's averaging applies
    exactly the single-process gradient.  ``dist_comm``: ``"gram"`` all-reduces the
    k×k Grams ``Z1ᵀZ1, Z2ᵀZ2`` and three scalars (eager PyTorch: refused with an explicit
    ``backend="triton"``); ``"gather"`` all-gathers the (B, k) features and evaluates the
    loss on them; ``"auto"`` picks the fewer bytes (:func:`spectral_dist_comm_choice`,
    after a size exchange), or ``"gather"`` under an explicit ``backend="triton"``.
    A no-op when not distributed.
    """
    choice = requested_backend(backend)
    gather = bool(gather_distributed) and D.is_distributed()
    check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
    mu = check_positive("mu", mu)
    check_choice("algorithm", algorithm, SPECTRAL_ALGORITHMS)
    check_choice("dist_comm", dist_comm, SPECTRAL_DIST_COMMS)
    check_spectral_config(choice, bool(gather_distributed), dist_comm)
    return _spectral(z1, z2, mu, bool(clip), algorithm, choice, gather, dist_comm)


def _spectral(z1, z2, mu: float, clip: bool, algorithm: str, choice: str, gather: bool,
              dist_comm: str) -> torch.Tensor:
    """Checked arguments; ``gather``: a process group of W > 1 ranks is active."""
    if gather:
        return _spectral_distributed(z1, z2, mu, clip, algorithm, choice, dist_comm)
    op = select(choice, "spectral", z1)
    if op is None:
        return reference.spectral_loss(z1, z2, mu=mu, clip=clip, algorithm=algorithm)
    return op.spectral_loss(z1, z2, mu, clip, algorithm)


# --------------------------------------------------------------------------- MINC
def check_minc_features(feature_norm: str, mu, scale) -> tuple[str, float, float]:
    return (check_choice("feature_norm", feature_norm, MINC_FEATURE_NORMS),
            check_positive("mu", mu), check_positive("scale", scale))


def minc_loss(
    p: torch.Tensor,
    t: torch.Tensor,
    moment: torch.Tensor,
    ordering: str = "standard",
    backend: str | None = None,
    feature_norm: str = "none",
    mu: float = 1.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """MINC loss for a given second-moment matrix ``moment`` (k×k, symmetric); stateless.

    ``p̃, t̃ = φ(p), φ(t)`` with ``φ`` the row map of ``feature_norm`` (``"none"``: identity,
    the default here, since ``moment`` is the caller's and must be the moment of the *mapped*
    targets; ``"l2"``: unit rows; ``"clip"``: rows clipped to norm √μ), times ``scale``; then
    ``L = (1/B) Σ_i [-2 p̃_i·t̃_i + p̃_iᵀ M p̃_i]`` (divided by μ for ``"clip"``).  ``t`` and
    ``M`` are stop-gradient; ``dL/dp̃_i = (2/B)(M p̃_i - t̃_i)``, or with ``ordering="gha"``
    ``(2/B)(LT(M) p̃_i - t̃_i)``, chained exactly through ``φ``.
    :class:`minc_kernels.MINCLoss` owns and updates ``M`` (and defaults to ``"l2"``).
    """
    choice = requested_backend(backend)
    check_pair("p", p, "t", t, min_batch=1)
    check_moment("moment", moment, p.shape[1], p.device)
    check_choice("ordering", ordering, MINC_ORDERINGS)
    feature_norm, mu, scale = check_minc_features(feature_norm, mu, scale)
    op = select(choice, "minc", p)
    p, t = _minc_features(p, t, feature_norm, mu, scale)
    loss = _minc_bilinear(op, p, t, moment, ordering)
    div = reference.minc_loss_divisor(feature_norm, mu)
    return loss if div == 1.0 else loss / div


def _minc_features(p, t, feature_norm: str, mu: float, scale: float):
    """``(φ(p), φ(sg t))``: the feature map in autograd, before the op (the op sees mapped rows)."""
    if t.requires_grad:  # a detach is an aten call: only where it changes something
        t = t.detach()
    if feature_norm == "none" and scale == 1.0:
        return p, t
    with torch.no_grad():
        t = reference.minc_features(t, feature_norm, mu, scale)
    return reference.minc_features(p, feature_norm, mu, scale), t


def _minc_bilinear(op: ModuleType | None, p, t, moment, ordering: str) -> torch.Tensor:
    """``(1/B) Σ [-2 p·t + pᵀ M p]`` of mapped, checked features on the chosen backend."""
    if op is None:
        return reference.minc_bilinear(p, t, moment, ordering)
    return op.minc_loss(p, t.detach(), moment.detach().float(), ordering)


def _moment_sum(op: ModuleType | None, t: torch.Tensor) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` (fp32 k×k; fp64 for fp64 ``t``), no gradient."""
    if op is None:
        return reference.minc_batch_moment_sum(t)
    return op.moment_sum(t.detach())


def _batch_moment(op: ModuleType | None, ts: Sequence[torch.Tensor], gather: bool) -> torch.Tensor:
    """``C = (1/n) Σ t tᵀ`` over every row of ``ts`` (and of every rank when ``gather``).

    The one moment path of MINC: :class:`~minc_kernels.MINCLoss` feeds it to
    :func:`minc_kernels.reference.minc_moment_update`.  Distributed: one all-reduce of
    ``[Σ t tᵀ, n]`` (k²+1 numbers, no gradient), so every rank gets the same C.
    """
    total = None
    for t in ts:
        s = _moment_sum(op, t)
        total = s if total is None else total + s
    rows = sum(t.shape[0] for t in ts)
    if not gather:
        return total.div_(rows)  # total is a fresh tensor: divide in place (no k×k allocation)
    k = total.shape[0]
    count = total.new_full((1,), float(rows))
    packed = D.all_reduce_sum(torch.cat([total.reshape(-1), count]))
    return packed[: k * k].reshape(k, k) / packed[k * k]


def minc_moment_sum(t: torch.Tensor, backend: str | None = None,
                    gather_distributed: bool = False, feature_norm: str = "none",
                    mu: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """``Σ_j t̃_j t̃_jᵀ`` of a (B, k) batch (``t̃ = φ(t)``, see :func:`minc_loss`) as a
    float32 (k, k) matrix, no gradient.

    ``gather_distributed=True``: the sum over the global batch (an all-reduce of the
    k×k local sums; divide by the global row count, e.g. ``D.all_reduce_sum`` of the
    local count, to get C).  :class:`minc_kernels.MINCLoss` packs both in one all-reduce.
    """
    choice = requested_backend(backend)
    check_features("t", t, min_batch=1)
    feature_norm, mu, scale = check_minc_features(feature_norm, mu, scale)
    op = select(choice, "minc", t)
    with torch.no_grad():
        _, t = _minc_features(t, t, feature_norm, mu, scale)
        s = _moment_sum(op, t)
        if gather_distributed and D.is_distributed():
            s = D.all_reduce_sum(s)
    return s


# --------------------------------------------------------------------------- MIO
def check_mio_config(choice: str, gather_distributed: bool) -> None:
    if choice == "triton" and gather_distributed:
        raise ValueError("backend='triton' cannot be honoured with gather_distributed=True: the "
                         "distributed MIO loss (local rows x gathered columns) is composed in "
                         "eager PyTorch; use backend='auto' or 'reference'")


def mio_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    pos_temperature: float = 0.5,
    neg_temperature: float = 0.5,
    lambda_l2: float = 1.0,
    backend: str | None = None,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """MIO binary contrastive loss of (B, k) views (docs/math.md §3); any B >= 2.

    ``mean_pos softplus(-S/τp) + mean_neg softplus(S/τn) + λ·mse(ẑ1, ẑ2)`` over
    ``S = Z Zᵀ`` of the normalised, stacked views (2B rows).

    ``gather_distributed=True`` (docs/math.md §5), inside a process group of W > 1 ranks:
    the loss of the *global* batch (B = Σ_r B_r, all pairs across ranks), the same value on
    every rank; each rank evaluates its 2B_r local rows against the 2B gathered columns
    and the three partial sums are all-reduced, so DDP's averaging applies exactly the
    single-process gradient.  Composed in eager PyTorch: an explicit ``backend="triton"``
    is refused.  A no-op when not distributed.
    """
    choice = requested_backend(backend)
    gather = bool(gather_distributed) and D.is_distributed()
    check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
    pos_temperature = check_positive("pos_temperature", pos_temperature)
    neg_temperature = check_positive("neg_temperature", neg_temperature)
    lambda_l2 = check_nonnegative("lambda_l2", lambda_l2)
    check_mio_config(choice, bool(gather_distributed))
    return _mio(z1, z2, pos_temperature, neg_temperature, lambda_l2, choice, gather)


def _mio(z1, z2, pos_temperature: float, neg_temperature: float, lambda_l2: float,
         choice: str, gather: bool) -> torch.Tensor:
    """Checked arguments; ``gather``: a process group of W > 1 ranks is active."""
    if gather:
        return _mio_distributed(z1, z2, pos_temperature, neg_temperature, lambda_l2)
    op = select(choice, "mio", z1)
    if op is None:
        # No Triton kernel here (CPU, or no Triton): "auto" runs the blocked path, which
        # streams row strips of S and never holds the 2B x 2B matrix (ops/mio_cpu.py).
        # float64 is the oracle/debug dtype and "reference" the oracle itself: both keep the
        # plain reference (it also supports double backward, the blocked op does not).
        if choice == "reference" or z1.dtype == torch.float64:
            return reference.mio_loss(z1, z2, pos_temperature, neg_temperature, lambda_l2)
        return mio_loss_blocked(z1, z2, pos_temperature, neg_temperature, lambda_l2)
    return op.mio_loss(z1, z2, pos_temperature, neg_temperature, lambda_l2)


# --------------------------------------------------------------------------- distributed (docs/math.md §5)
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


def _spectral_distributed(z1, z2, mu, clip, algorithm, choice, dist_comm):
    """Global-batch spectral loss, identical on every rank (module docstring of ``distributed``)."""
    k = z1.shape[1]
    sizes = None
    if dist_comm == "auto" and choice == "triton":
        dist_comm = "gather"  # the form that runs the kernels the caller asked for
    if dist_comm == "auto":
        sizes = D.gather_sizes(z1.shape[0], z1.device)
        acc_bytes = 8 if z1.dtype == torch.float64 else 4
        dist_comm = spectral_dist_comm_choice(k, sum(sizes), z1.element_size(), acc_bytes)
    if dist_comm == "gather":
        # One gather of [z1 | z2]; clipping is per row, so clipping after the gather is the same.
        zg = D.all_gather(torch.cat([z1, z2], dim=1), sizes=sizes)
        return _spectral(zg[:, :k].contiguous(), zg[:, k:].contiguous(), mu, clip, algorithm,
                         choice, False, dist_comm)
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
    cols_idx = torch.arange(n, device=z1.device)
    # torch.where masks, not boolean indexing (which needs the mask's values on the host).
    pos = cols_idx[None, :] == partner[:, None]
    neg = ~pos & (cols_idx[None, :] != own[:, None])
    zero = s.new_zeros(())
    sums = torch.stack([
        torch.where(pos, F.softplus(-s / pos_temperature), zero).sum(),
        torch.where(neg, F.softplus(s / neg_temperature), zero).sum(),
        (reference.acc(zh1) - reference.acc(zh2)).pow(2).sum(),
    ])
    red = D.all_reduce_sum(sums)
    return red[0] / n + red[1] / (n * (n - 2)) + lambda_l2 * red[2] / (b * k)
