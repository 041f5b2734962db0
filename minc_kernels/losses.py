"""Loss modules: hyper-parameters in the constructor, ``forward(a, b)`` returns a scalar.

The modules hold hyper-parameters and state (MINC's moment buffer) and call
:mod:`minc_kernels.functional`; they never see a kernel.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import distributed as D
from . import functional as Fn
from ._backend import preload, requested_backend
from ._validation import (
    check_choice,
    check_nonnegative,
    check_pair,
    check_positive,
    check_unit_interval,
)

__all__ = ["SpectralContrastiveLoss", "MIOLoss", "MINCLoss"]


class SpectralContrastiveLoss(nn.Module):
    """Spectral contrastive loss (HaoChen et al. 2021), SPEC §1.

    Args:
        mu: the loss's scale; rows are clipped to norm ``sqrt(mu)`` (default 1.0).
        clip: apply the norm clipping (default True, as the authors' code).
        algorithm: ``"auto"`` | ``"pairwise"`` | ``"gram"`` evaluation of the pairwise term.
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env
            ``MINC_KERNELS_BACKEND`` or ``"auto"``).
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, compute the loss
            of the *global* batch (every cross-rank pair included); the returned value is
            the global loss, equal on every rank, and DDP's gradient averaging applies
            exactly the gradient of one process holding the whole batch (default False;
            a no-op when not distributed).  See ``docs/distributed.md``.
        dist_comm: ``"auto"`` | ``"gram"`` (all-reduce the k×k Grams) | ``"gather"``
            (all-gather the features); ``"auto"`` picks the fewer bytes per step.

    ``forward(z1, z2)``: two (B, k) views, row i of one the positive of row i of the
    other; returns a float32 scalar.
    """

    def __init__(self, mu: float = 1.0, clip: bool = True, algorithm: str = "auto",
                 backend: str | None = None, gather_distributed: bool = False,
                 dist_comm: str = "auto"):
        super().__init__()
        self.mu = check_positive("mu", mu)
        self.clip = bool(clip)
        self.algorithm = check_choice("algorithm", algorithm, Fn.SPECTRAL_ALGORITHMS)
        if backend is not None:
            requested_backend(backend)
        self.backend = backend
        preload("spectral", backend)
        self.gather_distributed = bool(gather_distributed)
        self.dist_comm = check_choice("dist_comm", dist_comm, Fn.SPECTRAL_DIST_COMMS)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return Fn.spectral_contrastive_loss(z1, z2, self.mu, self.clip, self.algorithm,
                                            self.backend, self.gather_distributed, self.dist_comm)

    def extra_repr(self) -> str:
        s = (f"mu={self.mu}, clip={self.clip}, algorithm={self.algorithm!r}, "
             f"backend={self.backend!r}")
        if self.gather_distributed:
            s += f", gather_distributed=True, dist_comm={self.dist_comm!r}"
        return s


class MIOLoss(nn.Module):
    """MIO binary contrastive mutual-information loss (Manna et al. 2021), SPEC §3.

    Args:
        pos_temperature: τp for the positive pairs (default 0.5).
        neg_temperature: τn for the negative pairs (default 0.5).
        lambda_l2: weight of the alignment term ``mse(ẑ1, ẑ2)`` (default 1.0).
        backend: as for :class:`SpectralContrastiveLoss`.
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, the loss of the
            *global* batch: each rank's rows against the features gathered from all ranks
            (B = Σ_r B_r in every mean); the returned value is the global loss, equal on
            every rank, and DDP's averaging applies exactly the single-process gradient
            (default False; a no-op when not distributed).

    ``forward(z1, z2)``: two (B, k) views, any B >= 2; returns a float32 scalar.
    """

    def __init__(self, pos_temperature: float = 0.5, neg_temperature: float = 0.5,
                 lambda_l2: float = 1.0, backend: str | None = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.pos_temperature = check_positive("pos_temperature", pos_temperature)
        self.neg_temperature = check_positive("neg_temperature", neg_temperature)
        self.lambda_l2 = check_nonnegative("lambda_l2", lambda_l2)
        if backend is not None:
            requested_backend(backend)
        self.backend = backend
        preload("mio", backend)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return Fn.mio_loss(z1, z2, self.pos_temperature, self.neg_temperature, self.lambda_l2,
                           self.backend, self.gather_distributed)

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


class MINCLoss(nn.Module):
    """MINC: mutual-information non-contrastive loss (Guo et al. 2025), SPEC §2.

    Compares each online prediction ``p_i`` with its target ``t_i`` and with a running
    summary ``M ≈ E[t tᵀ]`` of all targets instead of with every other sample:
    ``L = (1/B) Σ_i [-2 p_i·t_i + p_iᵀ M p_i]``, gradient ``(2/B)(M p_i - t_i)``.

    Args:
        dim: feature dimension k (M is k×k).
        moment_momentum: β of the EMA ``M ← βM + (1-β)C`` (default 0.99; β=0 uses the
            batch moment only).  Our choice, not the paper's (not published).
        bias_correction: use ``M / (1 - β^n)`` after n updates, so step 1 uses C
            (default True; our choice).
        ordering: ``"standard"`` or ``"gha"`` (Generalized Hebbian ordering: the
            gradient uses the lower triangle of M; the reported loss is unchanged).
        check_finite: refuse (``ValueError``) targets whose moment is NaN/Inf, leaving M
            untouched (default True).  Under ``torch.compile`` the update is skipped
            instead of raising, so no graph break is needed.
        backend: as for :class:`SpectralContrastiveLoss`.
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, C is the moment
            of the *global* batch: one all-reduce of ``[Σ t tᵀ, count]`` (k²+1 numbers, no
            gradient) before the EMA, so every rank holds the same M (default False; a
            no-op when not distributed).  The loss stays the mean over the *local* rows:
            with equal local batch sizes DDP's averaging is then exactly the
            single-process gradient.  The returned value is the local mean (its mean over
            ranks is the global loss when local sizes are equal).  With unequal local sizes
            B_r, DDP applies ``∇ (1/W) Σ_r mean_{i∈r} ℓ_i``: rank r's samples weigh
            ``B/(W·B_r)`` times their single-process weight (M is still exact).

    State: ``moment`` (k×k float32, the raw EMA) and ``num_updates`` buffers, both in
    ``state_dict``.  M is updated only in training mode; eval uses it as is.

    ``forward(p, t)``: ``p`` (B, k) online predictions, ``t`` (B, k) targets of the other
    view (always treated as stop-gradient).  Symmetric BYOL-style use (SPEC §2.5):
    ``forward((p1, p2), (t2, t1))`` returns ``minc(p1, t2) + minc(p2, t1)`` and updates M
    once with C averaged over both targets.  ``return_parts=True`` also returns a dict
    of detached parts for logging: ``cross`` (``-2 tr(PᵀT)/B``), ``cov``
    (``<M, PᵀP/B>``) and ``moment_trace``.
    """

    def __init__(self, dim: int, moment_momentum: float = 0.99, bias_correction: bool = True,
                 ordering: str = "standard", check_finite: bool = True,
                 backend: str | None = None, gather_distributed: bool = False):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int (the feature dimension k), got {dim!r}")
        self.dim = dim
        self.moment_momentum = check_unit_interval("moment_momentum", moment_momentum)
        if self.moment_momentum == 1.0:
            raise ValueError("moment_momentum must be < 1 (with 1 the moment never changes), got 1.0")
        self.bias_correction = bool(bias_correction)
        self.ordering = check_choice("ordering", ordering, Fn.MINC_ORDERINGS)
        self.check_finite = bool(check_finite)
        if backend is not None:
            requested_backend(backend)
        self.backend = backend
        preload("minc", backend)
        self.gather_distributed = bool(gather_distributed)
        self.register_buffer("moment", torch.zeros(dim, dim, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ state
    def corrected_moment(self) -> torch.Tensor:
        """The M the loss uses now: bias-corrected raw EMA (raw if no correction/updates)."""
        if not self.bias_correction:
            return self.moment
        beta = self.moment_momentum
        n = self.num_updates.to(torch.float32)
        corr = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float32, device=n.device), n)
        # n == 0 (never updated): corr is 0; use the raw (zero) moment as is.
        return torch.where(n > 0, self.moment / torch.where(n > 0, corr, torch.ones_like(corr)),
                           self.moment)

    def _moment_sums(self, ts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ t tᵀ over all targets, their row count) for this step's C."""
        total = None
        for t in ts:
            s = Fn.minc_moment_sum(t, self.backend)
            total = s if total is None else total + s
        count = torch.tensor(float(sum(t.shape[0] for t in ts)), dtype=total.dtype, device=total.device)
        if self.gather_distributed and D.is_distributed():
            # One all-reduce of [Σ t tᵀ, count] (k²+1 numbers): every rank gets the same C, so
            # the finite check below passes or raises on all ranks alike and M stays identical.
            k = total.shape[0]
            packed = D.all_reduce_sum(torch.cat([total.reshape(-1), count.reshape(1)]))
            total, count = packed[: k * k].reshape(k, k), packed[k * k]
        return total, count

    @torch.no_grad()
    def update_moment(self, ts: Sequence[torch.Tensor]) -> None:
        """One EMA step of M with the batch moment of targets ``ts`` (training only)."""
        total, count = self._moment_sums(ts)
        c = total / count
        beta = self.moment_momentum
        new = beta * self.moment + (1.0 - beta) * c
        if self.check_finite:
            finite = torch.isfinite(c).all()
            if torch.compiler.is_compiling():
                # No data-dependent raise under compile: keep the old state instead.
                self.moment.copy_(torch.where(finite, new, self.moment))
                self.num_updates.add_(finite.to(self.num_updates.dtype))
                return
            if not bool(finite):
                raise ValueError("t contains NaN or Inf values; MINCLoss.moment was left unchanged "
                                 "(pass check_finite=False to skip this check)")
        self.moment.copy_(new)
        self.num_updates.add_(1)

    # ------------------------------------------------------------------ forward
    def forward(self, p, t, return_parts: bool = False):
        ps, ts = _as_list(p), _as_list(t)
        if len(ps) != len(ts) or not ps:
            raise ValueError(f"p and t must hold the same number (>= 1) of views, got {len(ps)} and {len(ts)}")
        for i, (pi, ti) in enumerate(zip(ps, ts)):
            sfx = f"[{i}]" if len(ps) > 1 else ""
            check_pair(f"p{sfx}", pi, f"t{sfx}", ti, min_batch=1)
            if pi.shape[1] != self.dim:
                raise ValueError(f"p{sfx} must have feature dimension k={self.dim} (MINCLoss(dim=...)), "
                                 f"got shape {tuple(pi.shape)}")
            if pi.device != self.moment.device:
                raise ValueError(f"p{sfx} is on {pi.device} but MINCLoss.moment is on "
                                 f"{self.moment.device}; move the loss with .to(device)")
            if pi.dtype != ps[0].dtype:
                raise TypeError(f"p{sfx} must have the same dtype as p[0]: expected {ps[0].dtype}, got {pi.dtype}")
        ts = [ti.detach() for ti in ts]
        if self.training:
            self.update_moment(ts)
        m = self.corrected_moment()
        loss = None
        for pi, ti in zip(ps, ts):
            li = Fn.minc_loss(pi, ti, m, self.ordering, self.backend)
            loss = li if loss is None else loss + li
        if not return_parts:
            return loss
        with torch.no_grad():
            cross = sum(-2.0 * (pi.float() * ti.float()).sum() / pi.shape[0] for pi, ti in zip(ps, ts))
            parts = {"cross": cross, "cov": loss.detach() - cross, "moment_trace": torch.trace(m)}
        return loss, parts

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, moment_momentum={self.moment_momentum}, "
                f"bias_correction={self.bias_correction}, ordering={self.ordering!r}, "
                f"check_finite={self.check_finite}, backend={self.backend!r}"
                + (", gather_distributed=True" if self.gather_distributed else ""))
