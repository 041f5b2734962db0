"""MINC: mutual-information non-contrastive loss (Guo et al. 2025), docs/math.md §2: the
module (which owns the running second moment ``M``), the functional forms, the dispatch
(Triton op or eager math, the distributed moment) and the eager math every fast path is
checked against.  Kernels: :mod:`minc_kernels.ops.minc` (on the shared Gram layer)."""
from __future__ import annotations

import math
import warnings
from types import ModuleType
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import UninitializedBuffer, is_lazy

from .. import distributed as D
from .._backend import preload, requested_backend, select
from .._validation import (
    check_choice,
    check_features,
    check_moment,
    check_pair,
    check_positive,
    check_unit_interval,
)
from ._common import CheckedHyperParams, LossSpec, acc, clip_rows, in_backward

__all__ = ["MINCLoss", "minc_loss", "minc_moment_sum", "minc_loss_reference", "MINC_DEFAULT_FEATURE_NORM",
           "FEATURE_NORMS", "ORDERINGS", "SPEC"]

ORDERINGS = ("standard", "gha")


# --------------------------------------------------------------------------- eager math
FEATURE_NORMS = ("l2", "clip", "none")


def l2_rows(x: torch.Tensor) -> torch.Tensor:
    """MINC's ``"l2"`` map: ``F.normalize(x, dim=1, eps=1e-12)`` bit for bit where the row
    norm is finite, and a NaN row where it overflows (fp32 rows near 1e20), so that such a
    target makes C non-finite (the step is skipped and counted, not taken as a zero moment)
    and such a prediction a NaN loss, never a silent zero row.  The ``+ n·0`` costs two ops
    on a (B, 1) column; an overflow-free float64 norm (as the spectral and MIO paths use)
    cost +20 % of a default CPU step (benchmarks/cpu_overhead.py)."""
    n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / (n.clamp_min(1e-12) + n * 0)


def minc_features(x: torch.Tensor, feature_norm: str = "none", mu: float = 1.0,
                  scale: float = 1.0) -> torch.Tensor:
    """The per-row map MINC applies to both ``p`` and ``t`` before the moment and the loss.

    ``"l2"``: ``s·x_i/max(‖x_i‖, 1e-12)``; ``"clip"``: ``s·x_i·min(1, √μ/‖x_i‖)``
    (:func:`clip_rows`); ``"none"``: ``s·x_i``.  ``s = scale``.  Differentiable (the map's
    Jacobian is part of the graph); the output keeps ``x``'s dtype.
    """
    if feature_norm == "l2":
        x = l2_rows(x)
    elif feature_norm == "clip":
        x = clip_rows(x, mu)
    elif feature_norm != "none":
        raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
    return x if scale == 1.0 else x * scale


def minc_loss_divisor(feature_norm: str, mu: float) -> float:
    """``μ`` for ``"clip"`` (the loss is divided by μ as the spectral loss is), else 1."""
    return float(mu) if feature_norm == "clip" else 1.0


def minc_batch_moment_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` (k×k, float32, no gradient)."""
    t = acc(t.detach() if t.requires_grad else t)  # a detach is an aten call: only if needed
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


def minc_moment_update_or_skip_(moment: torch.Tensor, batch_moment: torch.Tensor, weight: float,
                                num_updates: torch.Tensor, skips: torch.Tensor) -> None:
    """MINCLoss's default EMA step, decided on the device: ``M ← lerp(M, C, weight)``
    (``weight = 1 - β``) and ``num_updates += 1`` when C is finite; otherwise M and
    ``num_updates`` keep their values and ``skips += 1`` (no host sync)."""
    finite = all_finite(batch_moment)
    # a non-finite C is swapped for M itself, so the lerp leaves M as it was (M keeps its
    # dtype: a float64 C from float64 targets is rounded to M's float32)
    moment.lerp_(torch.where(finite, batch_moment.to(moment.dtype), moment), weight)
    num_updates.add_(finite)
    skips.add_(~finite)


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
        loss = bilinear_value(acc(p), acc(t), moment)
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


def bilinear_value(pf: torch.Tensor, tf: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """``(1/B) Σ_i [-2 p_i·t_i + p_iᵀ M p_i]`` of accumulation-dtype rows: the one place the
    MINC value is written (the reference, its GHA variant and MINCLoss's default step)."""
    return (-2.0 * (pf * tf).sum() + ((pf @ moment) * pf).sum()) / pf.shape[0]


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
    return bilinear_value(acc(p), acc(t), moment)


def minc_loss_reference(
    p: torch.Tensor, t: torch.Tensor, moment: torch.Tensor, ordering: str = "standard",
    feature_norm: str = "none", mu: float = 1.0, scale: float = 1.0,
) -> torch.Tensor:
    """The eager oracle: MINC loss for a given moment (math.md §2 step 3 and "Scale"), float32.

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




# --------------------------------------------------------------------------- functional
def check_features_config(feature_norm: str, mu, scale) -> tuple[str, float, float]:
    return (check_choice("feature_norm", feature_norm, FEATURE_NORMS),
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
    check_choice("ordering", ordering, ORDERINGS)
    feature_norm, mu, scale = check_features_config(feature_norm, mu, scale)
    op = select(choice, "minc", p)
    p, t = _minc_features(p, t, feature_norm, mu, scale)
    loss = _minc_bilinear(op, p, t, moment, ordering)
    div = minc_loss_divisor(feature_norm, mu)
    return loss if div == 1.0 else loss / div


def _minc_features(p, t, feature_norm: str, mu: float, scale: float):
    """``(φ(p), φ(sg t))``: the feature map in autograd, before the op (the op sees mapped rows)."""
    if t.requires_grad:  # a detach is an aten call: only where it changes something
        t = t.detach()
    if feature_norm == "none" and scale == 1.0:
        return p, t
    with torch.no_grad():
        t = minc_features(t, feature_norm, mu, scale)
    return minc_features(p, feature_norm, mu, scale), t


def _minc_bilinear(op: ModuleType | None, p, t, moment, ordering: str) -> torch.Tensor:
    """``(1/B) Σ [-2 p·t + pᵀ M p]`` of mapped, checked features on the chosen backend."""
    if op is None:
        return minc_bilinear(p, t, moment, ordering)
    return op.minc_loss(p, t.detach(), moment.detach().float(), ordering)


def _moment_sum(op: ModuleType | None, t: torch.Tensor) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` (fp32 k×k; fp64 for fp64 ``t``), no gradient."""
    if op is None:
        return minc_batch_moment_sum(t)
    return op.moment_sum(t.detach())


def _batch_moment(op: ModuleType | None, ts: Sequence[torch.Tensor], gather: bool) -> torch.Tensor:
    """``C = (1/n) Σ t tᵀ`` over every row of ``ts`` (and of every rank when ``gather``).

    The one moment path of MINC: :class:`~minc_kernels.MINCLoss` feeds it to
    :func:`minc_moment_update_`.  Distributed: one all-reduce of
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
    feature_norm, mu, scale = check_features_config(feature_norm, mu, scale)
    op = select(choice, "minc", t)
    with torch.no_grad():
        _, t = _minc_features(t, t, feature_norm, mu, scale)
        s = _moment_sum(op, t)
        if gather_distributed and D.is_distributed():
            s = D.all_reduce_sum(s)
    return s


# --------------------------------------------------------------------------- module
#: The feature map MINCLoss applies by default (see MINCLoss's docstring).  One constant so
#: that the study deciding it (issue 12) can change it in one place.  "l2" because the raw
#: form diverged in lightly's BYOL recipe (SGD lr 0.06) while L2-normalised inputs trained.
MINC_DEFAULT_FEATURE_NORM = "l2"


def _as_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"expected a tensor or a sequence of tensors, got {type(x).__name__}")


def _checked_pair(p, t, name_p: str, name_t: str, grad_on: bool):
    """One (p, t) view pair of MINCLoss.forward checked, ``t`` detached, both promoted to
    one dtype.  Shape/dtype/device checks only; aten calls only where they change something
    (the common call, one dtype and a ``t`` without grad, makes none)."""
    check_pair(name_p, p, name_t, t, min_batch=1, same_dtype=False)
    if t.requires_grad:
        if grad_on and not p.requires_grad:
            raise ValueError(
                f"{name_t} requires grad but {name_p} does not: the arguments look swapped. "
                "MINCLoss is called as loss(p, t) with p the online prediction (gets the "
                "gradient) and t the target (stop-gradient), e.g. criterion(p0, z1), not "
                "criterion(z1, p0)")
        t = t.detach()
    if p.dtype != t.dtype:
        dtype = torch.promote_types(p.dtype, t.dtype)
        p, t = p.to(dtype), t.to(dtype)
    return p, t


_Tensor, _F32 = torch.Tensor, torch.float32

#: The MINCLoss attributes the fast path of :meth:`MINCLoss.forward` depends on (assigning
#: one recomputes ``_hot``).
_HOT_CONFIG = frozenset({"moment_momentum", "bias_correction", "ordering", "feature_norm", "mu",
                         "scale", "_divisor", "check_finite", "_choice", "backend",
                         "gather_distributed"})

_CHECK_FINITE = {True: "raise", False: "ignore", "skip": "skip", "raise": "raise", "ignore": "ignore"}


def _check_moment_momentum(value) -> float:
    beta = check_unit_interval("moment_momentum", value)
    if beta == 1.0:
        raise ValueError("moment_momentum must be < 1 (with 1 the moment never changes), got 1.0")
    return beta


def _check_check_finite(value) -> str:
    if not isinstance(value, (bool, str)) or value not in _CHECK_FINITE:
        raise ValueError(f"check_finite must be 'skip', 'raise' (or True) or 'ignore' (or "
                         f"False), got {value!r}")
    return _CHECK_FINITE[value]


def _check_bool(name: str):
    def check(value) -> bool:
        if not isinstance(value, (bool, int)) or isinstance(value, float):
            raise TypeError(f"{name} must be a bool, got {value!r}")
        return bool(value)
    return check


class MINCLoss(CheckedHyperParams, nn.Module):
    """MINC: mutual-information non-contrastive loss (Guo et al. 2025), docs/math.md §2.

    Compares each online prediction with its target and with a running summary
    ``M ≈ E[t̃ t̃ᵀ]`` of all (mapped) targets instead of with every other sample.  With
    ``p̃ = φ(p)``, ``t̃ = φ(t)`` (the row map of ``feature_norm``, times ``scale``)::

        L = (1/B) Σ_i [-2 p̃_i·t̃_i + p̃_iᵀ M p̃_i] / d,   dL/dp̃_i = (2/B)(M p̃_i - t̃_i) / d

    chained exactly through ``φ`` to ``p``; ``t`` and ``M`` are stop-gradient.

    ``feature_norm`` (the map φ, applied to ``p`` and ``t`` alike; ``d`` the divisor):

    * ``"l2"`` (default, :data:`MINC_DEFAULT_FEATURE_NORM`): ``φ(x) = s·x/‖x‖``; M is the
      moment of unit targets (trace ``s²``), and with ``s = 1`` the loss lies in [-2, 1];
      ``d = 1``.  Scale-free, so it trains under recipes tuned for a cosine loss (lightly's
      BYOL at SGD lr 0.06), where the raw form diverges.
    * ``"clip"``: rows with ``‖x‖ ≥ √mu`` rescaled to norm ``√mu`` (the spectral loss's
      clipping, :func:`minc_kernels.losses._common.clip_rows`), times ``s``; ``d = mu``.
    * ``"none"``: ``φ(x) = s·x``, the raw form of the paper's derivation; ``d = 1``.

    Args:
        dim: feature dimension k (M is k×k), or None (default) to infer it at the first
            call, as ``nn.LazyLinear`` does: ``moment`` is then an ``UninitializedBuffer``
            until the first forward (or a ``load_state_dict``), and is created on the
            device of that call's ``p``.  Run one forward (or pass ``dim``) before wrapping
            a module holding the loss in DDP or ``torch.compile``.  Not an axis (lightly's
            ``NegativeCosineSimilarity(dim=1)`` is): the features are always dim 1.
        moment_momentum: β of the EMA ``M ← βM + (1-β)C`` (default 0.99; β=0 uses the
            batch moment only).  Our choice, not the paper's (not published).
        bias_correction: use ``M / (1 - β^n)`` after n updates, so step 1 uses C
            (default True; our choice).
        ordering: ``"standard"`` or ``"gha"`` (Generalized Hebbian ordering: the
            gradient uses the lower triangle of M; the reported loss is unchanged).
        feature_norm: ``"l2"`` | ``"clip"`` | ``"none"``, see above.
        mu: clip radius² for ``"clip"`` (default 1.0; ignored otherwise).
        scale: ``s`` above (default 1.0).
        check_finite: what a step whose targets give a NaN/Inf batch moment C does:
            ``"skip"`` (default): M and ``num_updates`` keep their values, decided on the
            device (``torch.where``, no host sync), and the buffer ``nonfinite_skips``
            counts the skipped steps; ``"raise"`` (or True): a ``ValueError``, M untouched
            (one host sync per step); ``"ignore"`` (or False): no check, M may turn NaN.
            Under ``torch.compile``, ``"raise"`` skips instead of raising.
        backend: as for :class:`SpectralContrastiveLoss`.
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, C is the moment
            of the *global* batch: one all-reduce of ``[Σ t̃ t̃ᵀ, count]`` (k²+1 numbers, no
            gradient) before the EMA, so every rank holds the same M (default False; a
            no-op when not distributed).  The loss stays the mean over the *local* rows:
            with equal local batch sizes DDP's averaging is then exactly the
            single-process gradient.  The returned value is the local mean (its mean over
            ranks is the global loss when local sizes are equal).  With unequal local sizes
            B_r, DDP applies ``∇ (1/W) Σ_r mean_{i∈r} ℓ_i``: rank r's samples weigh
            ``B/(W·B_r)`` times their single-process weight (M is still exact).

    State: ``moment`` (k×k float32, the raw EMA) and ``num_updates`` in ``state_dict``;
    ``nonfinite_skips`` (not saved).  M is updated only in training mode; eval uses it as
    is, and warns once if it was never updated (M = 0: the loss is then only the cross
    term; decided by a host flag, or on the first eval call by one read of ``num_updates``,
    so that an M written into the buffers directly counts).

    ``forward(p, t)``: ``p`` (B, k) online predictions, ``t`` (B, k) targets of the other
    view (always stop-gradient).  If ``t`` requires grad and ``p`` does not, the arguments
    are most likely swapped (lightly's SimSiam examples call ``criterion(z0, p1)``): a
    ``ValueError`` says so.  Mixed floating dtypes are accepted: each pair is promoted to
    ``torch.promote_types(p.dtype, t.dtype)`` (fp32 ``p`` with a bf16 target gives fp32).
    The value is a scalar, float32 (float64 for float64 inputs).

    **One EMA step per call.** Each training-mode call updates M once.  The symmetric
    BYOL use (docs/math.md §2.5) is one call, ``forward((p1, p2), (t2, t1))``: it returns
    ``minc(p1, t2) + minc(p2, t1)`` and updates M once with C averaged over both targets.
    lightly's form ``0.5 * (c(p0, z1) + c(p1, z0))`` makes two calls, so two EMA steps per
    optimizer step (an effective β² per step, the first on one view only); write
    ``0.5 * c((p0, p1), (z1, z0))`` instead.

    ``return_parts=True`` also returns a dict of detached parts for logging: ``cross``
    (``-2 tr(P̃ᵀT̃)/(B d)``), ``cov`` (``<M, P̃ᵀP̃/B>/d``) and ``moment_trace``.
    """

    _hparam_checks = {
        "moment_momentum": _check_moment_momentum,
        "bias_correction": _check_bool("bias_correction"),
        "ordering": lambda v: check_choice("ordering", v, ORDERINGS),
        "feature_norm": lambda v: check_choice("feature_norm", v, FEATURE_NORMS),
        "mu": lambda v: check_positive("mu", v),
        "scale": lambda v: check_positive("scale", v),
        "check_finite": _check_check_finite,
        "gather_distributed": _check_bool("gather_distributed"),
    }

    #: Constants of the fast path of :meth:`forward` (see :meth:`_refresh_hot`); the class
    #: default None (an instance unpickled from an older version) takes the general path.
    _hot = None
    _fused_step = False

    def __init__(self, dim: int | None = None, moment_momentum: float = 0.99,
                 bias_correction: bool = True, ordering: str = "standard",
                 check_finite: bool | str = "skip", backend: str | None = None,
                 gather_distributed: bool = False, *,
                 feature_norm: str = MINC_DEFAULT_FEATURE_NORM, mu: float = 1.0,
                 scale: float = 1.0):
        super().__init__()
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
            raise ValueError(f"dim must be a positive int (the feature dimension k; None infers it "
                             f"at the first call), got {dim!r}")
        self.dim = dim
        # Each assignment runs its check (_hparam_checks), here and after construction.
        self.moment_momentum = moment_momentum
        self.bias_correction = bias_correction
        self.ordering = ordering
        self.feature_norm, self.mu, self.scale = feature_norm, mu, scale
        self.check_finite = check_finite
        self.backend = backend  # also sets self._choice
        preload("minc", self._choice)
        self.gather_distributed = gather_distributed
        if dim is None:
            self.register_buffer("moment", UninitializedBuffer(dtype=torch.float32))
        else:
            self.register_buffer("moment", torch.zeros(dim, dim, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long), persistent=False)
        # Host-side facts (no sync needed to read them): M not created yet (dim=None); M was
        # updated or loaded; eval warned.
        self._lazy = dim is None
        self._moment_set = False
        self._warned_eval = False
        self._refresh_hot()

    # ------------------------------------------------------------------ lazy state
    def _materialize(self, k: int, device: torch.device) -> None:
        self.moment.materialize((k, k), device=device)
        with torch.no_grad():
            self.moment.zero_()
        self.num_updates = self.num_updates.to(device)
        self.nonfinite_skips = self.nonfinite_skips.to(device)
        self.dim = k
        self._lazy = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Everything is checked before anything changes: a refused load leaves dim, M and
        # num_updates as they were (nn.Module.load_state_dict then raises with these messages).
        errors = []
        loaded = state_dict.get(prefix + "moment")
        if loaded is not None and not is_lazy(loaded):
            k = self.dim
            if not isinstance(loaded, torch.Tensor) or not loaded.is_floating_point():
                errors.append(f"{prefix}moment must be a floating-point tensor, got "
                              f"{getattr(loaded, 'dtype', type(loaded).__name__)}")
            elif loaded.dim() != 2 or loaded.shape[0] != loaded.shape[1]:
                errors.append(f"{prefix}moment must have shape (k, k), got {tuple(loaded.shape)}")
            elif k is not None and loaded.shape[0] != k:
                errors.append(f"size mismatch for {prefix}moment: the checkpoint has k={loaded.shape[0]}, "
                              f"this MINCLoss has dim={k}")
            elif not bool(torch.isfinite(loaded).all()):  # a load, not the training path
                errors.append(f"{prefix}moment contains NaN or Inf values")
        count = state_dict.get(prefix + "num_updates")
        if count is not None:
            if (not isinstance(count, torch.Tensor) or count.numel() != 1
                    or count.dtype.is_floating_point or count.dtype.is_complex
                    or count.dtype == torch.bool):
                errors.append(f"{prefix}num_updates must be a one-element integer tensor, got "
                              f"{count!r}")
            elif int(count.reshape(())) < 0:
                errors.append(f"{prefix}num_updates must be >= 0, got {int(count.reshape(()))}")
        if errors:
            error_msgs.extend(errors)
            return
        if loaded is not None and not is_lazy(loaded):
            if self._lazy:
                self._materialize(loaded.shape[0], self.moment.device)
            self._moment_set = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # M is never cast below float32 by .half()/.to(bfloat16) (a 16-bit M would lose the
        # EMA's small updates); only its device follows.  .double() (lossless) applies.
        moment = self._buffers.get("moment")
        out = super()._apply(fn, recurse)
        new = self._buffers.get("moment")
        if (moment is not None and new is not None and not is_lazy(new)
                and new.dtype in (torch.float16, torch.bfloat16)):
            self._buffers["moment"] = moment.to(device=new.device)
        return out

    # ------------------------------------------------------------------ state
    def corrected_moment(self) -> torch.Tensor:
        """The M the loss uses now: bias-corrected raw EMA (raw if no correction/updates)."""
        if not self.bias_correction:
            return self.moment
        return minc_corrected_moment(self.moment, self.moment_momentum, self.num_updates)

    @torch.no_grad()
    def update_moment(self, ts: Sequence[torch.Tensor]) -> None:
        """One EMA step of M with the batch moment of the (unmapped) targets ``ts``.

        What a training-mode ``forward`` does before the loss; for callers that want to
        drive the update themselves.  The targets are mapped by ``feature_norm`` first.
        """
        ts = [t.detach() for t in _as_list(ts)]
        for i, ti in enumerate(ts):
            check_pair(f"t[{i}]", ti, "t[0]", ts[0], min_batch=1, same_dtype=False)
        self._check_state(ts[0], "t")
        op = select(self._choice, "minc", ts[0])
        self._update(op, [minc_features(t, self.feature_norm, self.mu, self.scale)
                          for t in ts])

    def _update(self, op, ts: list) -> None:
        """The EMA step on mapped targets; the moment path is _batch_moment and
        minc_moment_update_ (the oracle's own functions)."""
        gather = self.gather_distributed and D.is_distributed()
        c = _batch_moment(op, ts, gather)
        beta = self.moment_momentum
        moment, num_updates = self.moment, self.num_updates
        if not torch.compiler.is_compiling():
            self._moment_set = True  # a host flag: not set under compile (no guard on it)
        if self.check_finite == "ignore":
            minc_moment_update_(moment, c, beta)
            num_updates.add_(1)
            return
        if self.check_finite == "raise" and not torch.compiler.is_compiling():
            # Opt-in: a host sync.  Under compile (no data-dependent raise) it skips instead.
            if not bool(all_finite(c)):
                raise ValueError("t contains NaN or Inf values; MINCLoss.moment was left unchanged "
                                 "(check_finite='skip' skips such steps without a host sync)")
            minc_moment_update_(moment, c, beta)
            num_updates.add_(1)
            return
        minc_moment_update_or_skip_(moment, c, 1.0 - beta, num_updates, self.nonfinite_skips)

    def _check_state(self, x: torch.Tensor, name: str) -> None:
        """Create M at the first call (dim=None), then check k and the device."""
        if self._lazy:  # a Python flag, not is_lazy(): TorchDynamo traces it
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "MINCLoss(dim=None) creates its moment M at the first call, which cannot "
                    "happen inside torch.compile: pass dim=k to MINCLoss, or run one eager "
                    "forward before compiling")
            self._materialize(x.shape[1], x.device)
        if x.shape[1] != self.dim:
            raise ValueError(f"{name} must have feature dimension k={self.dim} (MINCLoss(dim=...) "
                             f"or the first call's k), got shape {tuple(x.shape)}")
        if x.device != self.moment.device:
            raise ValueError(f"{name} is on {x.device} but MINCLoss.moment is on "
                             f"{self.moment.device}; move the loss with .to(device)")

    # ------------------------------------------------------------------ forward
    def forward(self, p, t, return_parts: bool = False):
        # The default call (one float32 (p, t) pair, t without grad, the reference path:
        # the CPU or backend="reference"; check_finite="skip", bias correction, β > 0, the
        # "standard" ordering, no gather_distributed: self._hot) checks its tensors in one
        # expression and then calls the math functions _forward calls (l2_rows,
        # minc_batch_moment_sum, minc_moment_update_or_skip_, minc_corrected_moment,
        # bilinear_value), skipping only _forward's per-call dispatch and list handling:
        # on the CPU each Python call and aten op costs microseconds next to a B=1024, k=128
        # step (issue 13; without this path the raw form measured +15.7 % over hand-written
        # eager, benchmarks/results/cpu-overhead-2026-12-02).  Anything else, and every
        # input that would fail a check, goes to _forward, which raises the errors.
        hot = self._hot
        if hot is None or return_parts or type(p) is not _Tensor or type(t) is not _Tensor:
            return self._forward(p, t, return_parts)
        shape = p.shape
        device = p.device
        buffers = self._buffers
        moment = buffers["moment"]
        training = self.training
        # _forward's checks, on shapes/dtypes/devices only; dim is None (never equal to
        # shape[1]) while M is lazy; "auto" runs the kernels on CUDA (hot[3]: "reference").
        if not (p.dtype is _F32 and t.dtype is _F32 and not t.requires_grad
                and shape == t.shape and len(shape) == 2 and shape[0] >= 1
                and shape[1] == self.dim and moment.dtype is _F32
                and t.device == device and moment.device == device
                and (hot[3] or device.type != "cuda")
                and (training or self._moment_set or self._warned_eval)):
            return self._forward(p, t, return_parts)
        beta, weight, divisor, _, fmap = hot  # weight = 1 - β
        if fmap == "l2":  # minc_features(x, "l2"); t has no grad to stop
            t = l2_rows(t)
            p = l2_rows(p)
        elif fmap is not None:
            p, t = _minc_features(p, t, self.feature_norm, self.mu, self.scale)
        num_updates = buffers["num_updates"]
        if training and not in_backward():
            # _update's skip mode on C = tᵀt / B
            if not self._moment_set and not torch.compiler.is_compiling():
                self._moment_set = True  # a host flag: not set under compile (no guard on it)
            minc_moment_update_or_skip_(moment, minc_batch_moment_sum(t).div_(shape[0]), weight,
                                        num_updates, buffers["nonfinite_skips"])
        loss = bilinear_value(p, t, minc_corrected_moment(moment, beta, num_updates))
        return loss if divisor == 1.0 else loss / divisor

    def _refresh_hot(self) -> None:
        """``self._hot``: the constants of the fast path of :meth:`forward` when the
        configuration allows it, else None; recomputed whenever one of ``_HOT_CONFIG`` is
        assigned."""
        d = self.__dict__
        beta = d["moment_momentum"]
        ok = (d["check_finite"] == "skip" and d["bias_correction"] and 0.0 < beta < 1.0
              and d["ordering"] == "standard" and not d["gather_distributed"]
              and d["_choice"] in ("reference", "auto"))
        fmap = None if d["feature_norm"] == "none" and d["scale"] == 1.0 else (
            "l2" if d["feature_norm"] == "l2" and d["scale"] == 1.0 else "other")
        d["_hot"] = ((beta, 1.0 - beta, d["_divisor"],
                      d["_choice"] == "reference", fmap) if ok else None)
        # the kernels' fused step (_fused_forward): the l2 map at scale 1, a C check it can
        # make on the device (the l2 map makes C finite unless a whole row is NaN)
        d["_fused_step"] = (d["feature_norm"] == "l2" and d["scale"] == 1.0
                            and d["check_finite"] in ("skip", "ignore"))

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)  # CheckedHyperParams: checks the hyper-parameters
        if name in ("feature_norm", "mu") and "mu" in self.__dict__ and "feature_norm" in self.__dict__:
            super().__setattr__("_divisor", minc_loss_divisor(self.feature_norm, self.mu))
        if name in _HOT_CONFIG and "_hot" in self.__dict__:
            self._refresh_hot()

    def _forward(self, p, t, return_parts: bool):
        grad_on = torch.is_grad_enabled()
        if isinstance(p, torch.Tensor) and isinstance(t, torch.Tensor):
            # One pair, the common call: fixed names, no per-call lists or f-strings.
            pairs = [_checked_pair(p, t, "p", "t", grad_on)]
            first = "p"
        else:
            ps, ts = _as_list(p), _as_list(t)
            if len(ps) != len(ts) or not ps:
                raise ValueError(f"p and t must hold the same number (>= 1) of views, got "
                                 f"{len(ps)} and {len(ts)}")
            pairs = []
            for i, (pi, ti) in enumerate(zip(ps, ts)):
                sfx = f"[{i}]" if len(ps) > 1 else ""
                pairs.append(_checked_pair(pi, ti, f"p{sfx}", f"t{sfx}", grad_on))
                dtype = pairs[-1][0].dtype
                if dtype != pairs[0][0].dtype:
                    raise TypeError(f"p{sfx}/t{sfx} promote to {dtype} but p[0]/t[0] to "
                                    f"{pairs[0][0].dtype}; pass every view in one dtype")
            first = "p[0]" if len(ps) > 1 else "p"
        self._check_state(pairs[0][0], first)
        for i, (pi, _) in enumerate(pairs[1:], 1):
            if pi.shape[1] != self.dim:
                raise ValueError(f"p[{i}] must have feature dimension k={self.dim}, got shape "
                                 f"{tuple(pi.shape)}")
        op = select(self._choice, "minc", pairs[0][0])
        # (in backward: activation checkpointing recomputes this forward; M was updated once
        # already in the original forward, which used the M the recomputation reads)
        update = self.training and not in_backward()
        if not update:
            self._warn_eval_unset()
        if (op is not None and not return_parts and self._fused_step
                and self.moment.is_contiguous()  # the EMA kernel walks M flat
                and not (self.gather_distributed and D.is_distributed())):
            return self._fused_forward(op, pairs, update)
        pairs = [_minc_features(pi, ti, self.feature_norm, self.mu, self.scale)
                 for pi, ti in pairs]
        if update:
            self._update(op, [ti for _, ti in pairs])
        m = self.corrected_moment()
        loss = None
        for pi, ti in pairs:
            li = _minc_bilinear(op, pi, ti, m, self.ordering)
            loss = li if loss is None else loss + li
        if self._divisor != 1.0:
            loss = loss / self._divisor
        if not return_parts:
            return loss
        with torch.no_grad():
            cross = sum(-2.0 * (acc(pi) * acc(ti)).sum() / pi.shape[0]
                        for pi, ti in pairs) / self._divisor
            parts = {"cross": cross, "cov": loss.detach() - cross, "moment_trace": torch.trace(m)}
        return loss, parts

    def _warn_eval_unset(self) -> None:
        """Once per module, in eval only: a warning when M was never updated nor loaded (M
        may have been written directly: a host read of num_updates here is off the training
        path)."""
        if self._moment_set or self._warned_eval or torch.compiler.is_compiling():
            return
        self._warned_eval = True
        if bool(self.num_updates > 0):
            self._moment_set = True
        else:
            warnings.warn("MINCLoss is in eval mode but its moment M was never updated (no "
                          "training-mode call) nor loaded: M = 0, so the loss is only the "
                          "cross term", RuntimeWarning, stacklevel=3)

    def _fused_forward(self, op, pairs, update: bool):
        """The kernels' default step (feature map "l2", scale 1, check "skip" or "ignore", no
        gather): the targets' map, their moment and the EMA with its bias correction in one
        op (ops.minc.moment_step: three launches where the general path runs about 20 torch
        ops), then per pair the map of p and the loss with its gradient chained through the
        map in one op (ops.minc.minc_l2_loss).  Same math as the general path; the map's
        rounding differs (one rounding of x/‖x‖ in the kernels, eager bf16 rounds the norm
        first)."""
        ts = [ti for _, ti in pairs]
        if update and not torch.compiler.is_compiling():
            self._moment_set = True  # a host flag: not set under compile (no guard on it)
        bias = self.bias_correction and self.moment_momentum > 0.0
        outs = op.moment_step(ts, self.moment, self.num_updates, self.nonfinite_skips,
                              self.moment_momentum, update, self.check_finite == "skip",
                              self.bias_correction)
        m = outs[0] if bias else self.moment
        hats = outs[1:] if bias else outs
        loss = None
        for (pi, _), hi in zip(pairs, hats):
            li = op.minc_l2_loss(pi, hi, m, self.ordering)
            loss = li if loss is None else loss + li
        return loss

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, moment_momentum={self.moment_momentum}, "
                f"bias_correction={self.bias_correction}, ordering={self.ordering!r}, "
                f"feature_norm={self.feature_norm!r}"
                + (f", mu={self.mu}" if self.feature_norm == "clip" else "")
                + (f", scale={self.scale}" if self.scale != 1.0 else "")
                + f", check_finite={self.check_finite!r}, backend={self.backend!r}"
                + (", gather_distributed=True" if self.gather_distributed else ""))


# --------------------------------------------------------------------------- registry entry
def _step(p, t, backend=None, **variant):
    """One MINC step's loss work: the batch moment ``M = TᵀT/B`` then the loss with it."""
    moment = minc_moment_sum(t, backend=backend) / t.shape[0]
    return minc_loss(p, t, moment, backend=backend, **variant)


SPEC = LossSpec(
    name="minc", module=MINCLoss, functional=minc_loss,
    reference=lambda p, t: minc_loss_reference(p, t, minc_batch_moment_sum(t) / t.shape[0]),
    step=_step, arg_names=("p", "t"), grad_args=(0,), op="minc",
    # fwd: the moment TᵀT and P M; bwd: M P (a kernel forming it in the forward is still
    # credited in bwd only)
    matmul_flops=lambda b, k: (4.0 * b * k * k, 2.0 * b * k * k),
    module_kwargs=lambda k: {"dim": k},
    variants={"gha": {"ordering": "gha"}},
)
