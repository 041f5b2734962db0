"""Loss modules: hyper-parameters in the constructor, ``forward(a, b)`` returns a scalar.

The modules hold hyper-parameters and state (MINC's moment buffer), validate them once
at construction (the backend included: ``MINC_KERNELS_BACKEND`` is read then), check the
tensors once per call, and call the checked core of :mod:`minc_kernels.functional`; they
never see a kernel.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import UninitializedBuffer, is_lazy

from . import distributed as D
from . import functional as Fn
from . import reference
from ._backend import preload, requested_backend, select
from ._validation import (
    check_choice,
    check_nonnegative,
    check_pair,
    check_positive,
    check_unit_interval,
)

__all__ = ["SpectralContrastiveLoss", "MIOLoss", "MINCLoss", "MINC_DEFAULT_FEATURE_NORM"]

#: The feature map MINCLoss applies by default (see MINCLoss's docstring).  One constant so
#: that the study deciding it (issue 12) can change it in one place.  "l2" because the raw
#: form diverged in lightly's BYOL recipe (SGD lr 0.06) while L2-normalised inputs trained.
MINC_DEFAULT_FEATURE_NORM = "l2"


class SpectralContrastiveLoss(nn.Module):
    """Spectral contrastive loss (HaoChen et al. 2021), docs/math.md §1.

    Args:
        mu: the loss's scale; rows are clipped to norm ``sqrt(mu)`` (default 1.0).
        clip: apply the norm clipping (default True, as the authors' code).
        algorithm: ``"auto"`` | ``"pairwise"`` | ``"gram"`` evaluation of the pairwise term.
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env
            ``MINC_KERNELS_BACKEND``, read here, or ``"auto"``).
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, compute the loss
            of the *global* batch (every cross-rank pair included); the returned value is
            the global loss, equal on every rank, and DDP's gradient averaging applies
            exactly the gradient of one process holding the whole batch (default False;
            a no-op when not distributed).  See ``docs/distributed.md``.
        dist_comm: ``"auto"`` | ``"gram"`` (all-reduce the k×k Grams; eager PyTorch, so
            refused with ``backend="triton"``) | ``"gather"`` (all-gather the features);
            ``"auto"`` picks the fewer bytes per step (``"gather"`` under ``backend="triton"``).

    ``forward(z1, z2)``: two (B, k) views of one dtype, row i of one the positive of row i
    of the other; returns a scalar (float32; float64 for float64 inputs).
    """

    def __init__(self, mu: float = 1.0, clip: bool = True, algorithm: str = "auto",
                 backend: str | None = None, gather_distributed: bool = False,
                 dist_comm: str = "auto"):
        super().__init__()
        self.mu = check_positive("mu", mu)
        self.clip = bool(clip)
        self.algorithm = check_choice("algorithm", algorithm, Fn.SPECTRAL_ALGORITHMS)
        self.backend = backend
        self._choice = requested_backend(backend)
        self.gather_distributed = bool(gather_distributed)
        self.dist_comm = check_choice("dist_comm", dist_comm, Fn.SPECTRAL_DIST_COMMS)
        Fn.check_spectral_config(self._choice, self.gather_distributed, self.dist_comm)
        preload("spectral", self._choice)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        gather = self.gather_distributed and D.is_distributed()
        check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
        return Fn._spectral(z1, z2, self.mu, self.clip, self.algorithm, self._choice, gather,
                            self.dist_comm)

    def extra_repr(self) -> str:
        s = (f"mu={self.mu}, clip={self.clip}, algorithm={self.algorithm!r}, "
             f"backend={self.backend!r}")
        if self.gather_distributed:
            s += f", gather_distributed=True, dist_comm={self.dist_comm!r}"
        return s


class MIOLoss(nn.Module):
    """MIO binary contrastive mutual-information loss (Manna et al. 2021), docs/math.md §3.

    Args:
        pos_temperature: τp for the positive pairs (default 0.5).
        neg_temperature: τn for the negative pairs (default 0.5).
        lambda_l2: weight of the alignment term ``mse(ẑ1, ẑ2)`` (default 1.0).
        backend: as for :class:`SpectralContrastiveLoss`.
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, the loss of the
            *global* batch: each rank's rows against the features gathered from all ranks
            (B = Σ_r B_r in every mean); the returned value is the global loss, equal on
            every rank, and DDP's averaging applies exactly the single-process gradient
            (default False; a no-op when not distributed).  Composed in eager PyTorch, so
            refused with ``backend="triton"``.
        temperature: one value for both τp and τn (as lightly's ``NTXentLoss(temperature=)``);
            combining it with a different explicit ``pos_temperature``/``neg_temperature``
            is an error.

    ``forward(z1, z2)``: two (B, k) views, any B >= 2; returns a scalar (float32; float64
    for float64 inputs).
    """

    def __init__(self, pos_temperature: float | None = None, neg_temperature: float | None = None,
                 lambda_l2: float = 1.0, backend: str | None = None,
                 gather_distributed: bool = False, *, temperature: float | None = None):
        super().__init__()
        if temperature is not None:
            temperature = check_positive("temperature", temperature)
            for name, value in (("pos_temperature", pos_temperature),
                                ("neg_temperature", neg_temperature)):
                if value is not None and check_positive(name, value) != temperature:
                    raise ValueError(f"temperature={temperature} sets both temperatures, but "
                                     f"{name}={value} was also given; pass one or the other")
            pos_temperature = neg_temperature = temperature
        self.pos_temperature = check_positive(
            "pos_temperature", 0.5 if pos_temperature is None else pos_temperature)
        self.neg_temperature = check_positive(
            "neg_temperature", 0.5 if neg_temperature is None else neg_temperature)
        self.lambda_l2 = check_nonnegative("lambda_l2", lambda_l2)
        self.backend = backend
        self._choice = requested_backend(backend)
        self.gather_distributed = bool(gather_distributed)
        Fn.check_mio_config(self._choice, self.gather_distributed)
        preload("mio", self._choice)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        gather = self.gather_distributed and D.is_distributed()
        check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
        return Fn._mio(z1, z2, self.pos_temperature, self.neg_temperature, self.lambda_l2,
                       self._choice, gather)

    def extra_repr(self) -> str:
        s = (f"pos_temperature={self.pos_temperature}, neg_temperature={self.neg_temperature}, "
             f"lambda_l2={self.lambda_l2}, backend={self.backend!r}")
        if self.gather_distributed:
            s += ", gather_distributed=True"
        return s


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
                         "scale", "_divisor", "check_finite", "_choice", "gather_distributed"})

_CHECK_FINITE = {True: "raise", False: "ignore", "skip": "skip", "raise": "raise", "ignore": "ignore"}


class MINCLoss(nn.Module):
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
      clipping, :func:`minc_kernels.reference.clip_rows`), times ``s``; ``d = mu``.
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

    #: Constants of the fast path of :meth:`forward` (see :meth:`_refresh_hot`); the class
    #: default None (an instance unpickled from an older version) takes the general path.
    _hot = None

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
        self.moment_momentum = check_unit_interval("moment_momentum", moment_momentum)
        if self.moment_momentum == 1.0:
            raise ValueError("moment_momentum must be < 1 (with 1 the moment never changes), got 1.0")
        self.bias_correction = bool(bias_correction)
        self.ordering = check_choice("ordering", ordering, Fn.MINC_ORDERINGS)
        self.feature_norm, self.mu, self.scale = Fn.check_minc_features(feature_norm, mu, scale)
        self._divisor = reference.minc_loss_divisor(self.feature_norm, self.mu)
        if not isinstance(check_finite, (bool, str)) or check_finite not in _CHECK_FINITE:
            raise ValueError(f"check_finite must be 'skip', 'raise' (or True) or 'ignore' (or "
                             f"False), got {check_finite!r}")
        self.check_finite = _CHECK_FINITE[check_finite]
        self.backend = backend
        self._choice = requested_backend(backend)
        preload("minc", self._choice)
        self.gather_distributed = bool(gather_distributed)
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
        key = prefix + "moment"
        if key in state_dict:
            loaded = state_dict[key]
            if self._lazy and not is_lazy(loaded):
                if loaded.dim() != 2 or loaded.shape[0] != loaded.shape[1]:
                    error_msgs.append(f"{key} must have shape (k, k), got {tuple(loaded.shape)}")
                    return
                self._materialize(loaded.shape[0], self.moment.device)
            self._moment_set = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ state
    def corrected_moment(self) -> torch.Tensor:
        """The M the loss uses now: bias-corrected raw EMA (raw if no correction/updates)."""
        if not self.bias_correction:
            return self.moment
        return reference.minc_corrected_moment(self.moment, self.moment_momentum, self.num_updates)

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
        self._update(op, [reference.minc_features(t, self.feature_norm, self.mu, self.scale)
                          for t in ts])

    def _update(self, op, ts: list) -> None:
        """The EMA step on mapped targets; the moment path is functional._batch_moment and
        reference.minc_moment_update (the oracle's own functions)."""
        gather = self.gather_distributed and D.is_distributed()
        c = Fn._batch_moment(op, ts, gather)
        beta = self.moment_momentum
        moment, num_updates = self.moment, self.num_updates
        self._moment_set = True
        if self.check_finite == "ignore":
            reference.minc_moment_update_(moment, c, beta)
            num_updates.add_(1)
            return
        finite = reference.all_finite(c)
        if self.check_finite == "raise" and not torch.compiler.is_compiling():
            # Opt-in: a host sync.  Under compile (no data-dependent raise) it skips instead.
            if not bool(finite):
                raise ValueError("t contains NaN or Inf values; MINCLoss.moment was left unchanged "
                                 "(check_finite='skip' skips such steps without a host sync)")
            reference.minc_moment_update_(moment, c, beta)
            num_updates.add_(1)
            return
        # A non-finite C is swapped for M itself, so the lerp leaves M as it was.
        reference.minc_moment_update_(moment, torch.where(finite, c, moment), beta)
        num_updates.add_(finite)
        self.nonfinite_skips.add_(~finite)

    def _check_state(self, x: torch.Tensor, name: str) -> None:
        """Create M at the first call (dim=None), then check k and the device."""
        if self._lazy:  # a Python flag, not is_lazy(): TorchDynamo traces it
            self._materialize(x.shape[1], x.device)
        if x.shape[1] != self.dim:
            raise ValueError(f"{name} must have feature dimension k={self.dim} (MINCLoss(dim=...) "
                             f"or the first call's k), got shape {tuple(x.shape)}")
        if x.device != self.moment.device:
            raise ValueError(f"{name} is on {x.device} but MINCLoss.moment is on "
                             f"{self.moment.device}; move the loss with .to(device)")

    # ------------------------------------------------------------------ forward
    def forward(self, p, t, return_parts: bool = False):
        # The default call in one straight line (no further library calls), taken for one
        # float32 (p, t) pair, t without grad, on the reference path (the CPU, or
        # backend="reference"), with check_finite="skip", bias correction, β > 0, the
        # "standard" ordering and no gather_distributed (self._hot).  Anything else, and
        # every input that would fail a check, goes to _forward, which raises the errors.
        # Why a second path: on the CPU each Python call, attribute read and aten op costs
        # microseconds next to a B=1024, k=128 step, and this one makes as few as the checks
        # allow (issue 13).  Same ops on the same values as _forward, so bit for bit the
        # same loss, gradient and state as the one-element-list call loss([p], [t]).
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
        log_beta, weight, divisor, _, fmap = hot  # weight = 1 - β
        if fmap == "l2":  # reference.minc_features(x, "l2") inline; t has no grad to stop
            t = F.normalize(t, dim=1, eps=1e-12)
            p = F.normalize(p, dim=1, eps=1e-12)
        elif fmap is not None:
            p, t = Fn._minc_features(p, t, self.feature_norm, self.mu, self.scale)
        num_updates = buffers["num_updates"]
        if training:
            # _update: C = tᵀt / B (reference.minc_batch_moment_sum), the finite check of
            # reference.all_finite, the skip by torch.where, the counters.
            if not self._moment_set:
                self._moment_set = True
            c = (t.T @ t).div_(shape[0])
            finite = (c * 0).sum() == 0
            moment.lerp_(torch.where(finite, c, moment), weight)
            num_updates.add_(finite)
            buffers["nonfinite_skips"].add_(~finite)
        # reference.minc_corrected_moment and reference.minc_bilinear, op for op.
        m = moment / torch.expm1(num_updates * log_beta).neg_().clamp_min_(weight)
        loss = (-2.0 * (p * t).sum() + ((p @ m) * p).sum()) / shape[0]
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
        d["_hot"] = ((math.log(beta), 1.0 - beta, d["_divisor"],
                      d["_choice"] == "reference", fmap) if ok else None)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
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
        pairs = [Fn._minc_features(pi, ti, self.feature_norm, self.mu, self.scale)
                 for pi, ti in pairs]
        if self.training:
            self._update(op, [ti for _, ti in pairs])
        elif not self._moment_set and not self._warned_eval and not torch.compiler.is_compiling():
            # Once per module, in eval only: M may have been written directly (a host read of
            # num_updates here is off the training path).
            self._warned_eval = True
            if bool(self.num_updates > 0):
                self._moment_set = True
            else:
                warnings.warn("MINCLoss is in eval mode but its moment M was never updated (no "
                              "training-mode call) nor loaded: M = 0, so the loss is only the "
                              "cross term", RuntimeWarning, stacklevel=2)
        m = self.corrected_moment()
        loss = None
        for pi, ti in pairs:
            li = Fn._minc_bilinear(op, pi, ti, m, self.ordering)
            loss = li if loss is None else loss + li
        if self._divisor != 1.0:
            loss = loss / self._divisor
        if not return_parts:
            return loss
        with torch.no_grad():
            cross = sum(-2.0 * (reference.acc(pi) * reference.acc(ti)).sum() / pi.shape[0]
                        for pi, ti in pairs) / self._divisor
            parts = {"cross": cross, "cov": loss.detach() - cross, "moment_trace": torch.trace(m)}
        return loss, parts

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, moment_momentum={self.moment_momentum}, "
                f"bias_correction={self.bias_correction}, ordering={self.ordering!r}, "
                f"feature_norm={self.feature_norm!r}"
                + (f", mu={self.mu}" if self.feature_norm == "clip" else "")
                + (f", scale={self.scale}" if self.scale != 1.0 else "")
                + f", check_finite={self.check_finite!r}, backend={self.backend!r}"
                + (", gather_distributed=True" if self.gather_distributed else ""))
