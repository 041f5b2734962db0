"""Each method's wiring, in one place: its heads, its loss module, how the two views reach
the loss (MINC: predictions against the EMA target's projections, used symmetrically), and
the EMA step of the target network.

The training loop (:mod:`.engine`), ``minc_train.bench_step`` and the studies all build
and call a method through these functions, so the three agree by construction.

    model = build_model(method, backbone, feat_dim, ...)     # SSLModel with the method's heads
    target = build_target(method, model)                     # MomentumEncoder or None
    loss_fn = build_loss(method, proj_dim, backend=...)
    out = forward_views(model, target, x1, x2)               # z1, z2, p1, p2, t1, t2
    loss = compute_loss(method, loss_fn, out, normalize=...)
    momentum = update_target(target, step, total_steps, base, backend=...)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from minc_kernels import (BarlowTwinsLoss, MINCLoss, MIOLoss, MomentumEncoder,
                          SpectralContrastiveLoss, VICRegLoss, cosine_momentum)

from .models import SSLModel, mlp

METHODS = ("minc", "spectral", "mio", "barlow", "vicreg")
MINC_ABLATIONS = ("none", "no-moment")
# Methods with an EMA target network (and a predictor on the online side).
TARGET_METHODS = ("minc",)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def build_model(method: str, backbone: nn.Module, feat_dim: int, proj_hidden: int, proj_dim: int,
                proj_layers: int = 2, pred_hidden: int | None = None) -> SSLModel:
    """The online network: ``backbone`` + projector (MIO: ending in BatchNorm, as its recipe
    has it) + predictor ``proj_dim -> pred_hidden -> proj_dim`` (MINC only)."""
    _check_method(method)
    projector = mlp(feat_dim, proj_hidden, proj_dim, proj_layers, last_bn=method == "mio")
    predictor = None
    if method in TARGET_METHODS:
        predictor = mlp(proj_dim, pred_hidden or proj_hidden, proj_dim, 2)
    return SSLModel(backbone, projector, predictor)


def build_target(method: str, model: SSLModel) -> MomentumEncoder | None:
    """The EMA copy of the encoder (backbone + projector) that MINC predicts; None otherwise.
    Call after moving ``model`` to its device and memory format: the copy keeps both."""
    _check_method(method)
    return MomentumEncoder(model.encoder) if method in TARGET_METHODS else None


def build_loss(method: str, proj_dim: int, *, backend: str | None = None, mu: float = 1.0,
               moment_momentum: float = 0.99, ordering: str = "standard",
               gather_distributed: bool = False) -> nn.Module:
    """The method's loss module.  ``gather_distributed``: under DDP the loss sees the global
    batch (docs/math.md §5).  ``backend``: that of the loss modules (None: their default)."""
    _check_method(method)
    kw = {"backend": backend}
    if gather_distributed:
        kw["gather_distributed"] = True
    if method == "minc":
        return MINCLoss(proj_dim, moment_momentum=moment_momentum, ordering=ordering, **kw)
    if method == "spectral":
        return SpectralContrastiveLoss(mu=mu, **kw)
    if method == "barlow":  # lightly's defaults (lambda_param=5e-3)
        return BarlowTwinsLoss(**kw)
    if method == "vicreg":  # lightly's defaults (25, 25, 1, eps=1e-4)
        return VICRegLoss(**kw)
    return MIOLoss(**kw)


class ViewOutputs(NamedTuple):
    """Projections ``z``, predictions ``p`` (None without a predictor) and target projections
    ``t`` (None without a target; cast to the predictions' dtype) of the two views."""
    z1: torch.Tensor
    z2: torch.Tensor
    p1: torch.Tensor | None
    p2: torch.Tensor | None
    t1: torch.Tensor | None
    t2: torch.Tensor | None


def forward_views(model: nn.Module, target: MomentumEncoder | None, x1: torch.Tensor,
                  x2: torch.Tensor) -> ViewOutputs:
    """Both views through the online network (``model`` may be its DDP wrapper) and, when
    there is one, the EMA target (under ``no_grad``)."""
    z1, p1 = model(x1)
    z2, p2 = model(x2)
    t1 = t2 = None
    if target is not None:
        t1, t2 = target(x1), target(x2)
        if p1 is not None:
            t1, t2 = t1.to(p1.dtype), t2.to(p1.dtype)
    return ViewOutputs(z1, z2, p1, p2, t1, t2)


def minc_pairs(out: ViewOutputs, normalize: bool = False):
    """MINC's symmetric call arguments ``((p1, p2), (t2, t1))``: each view's prediction
    against the other view's target.  ``normalize``: compare directions (BYOL-style unit
    vectors) instead of raw vectors."""
    p1, p2, t1, t2 = out.p1, out.p2, out.t1, out.t2
    if p1 is None or t1 is None:
        raise ValueError("MINC needs predictions and target projections (a predictor and an "
                         "EMA target: build them with build_model/build_target for 'minc')")
    if normalize:
        p1, p2, t1, t2 = (nn.functional.normalize(v, dim=1) for v in (p1, p2, t1, t2))
    return (p1, p2), (t2, t1)


def minc_no_moment_loss(p, t) -> torch.Tensor:
    """MINC without its covariance term: ``-(2/B) Σ_i p_i·t_i`` per pair, summed over the
    pairs when ``p`` and ``t`` are tuples (symmetric use: ``((p1, p2), (t2, t1))``).
    ``t`` is treated as stop-gradient.  Unbounded below (nothing stops the norms growing)."""
    if isinstance(p, torch.Tensor):
        p, t = (p,), (t,)
    if len(p) != len(t):
        raise ValueError(f"p and t must pair up, got {len(p)} predictions and {len(t)} targets")
    total = None
    for pi, ti in zip(p, t):
        if pi.dim() != 2 or pi.shape != ti.shape:
            raise ValueError(f"p and t must be (B, k) of the same shape, got {tuple(pi.shape)} and "
                             f"{tuple(ti.shape)}")
        term = -2.0 * (pi.float() * ti.detach().float()).sum(1).mean()
        total = term if total is None else total + term
    return total


def normalizes_features(loss_fn: nn.Module) -> bool:
    """Whether ``loss_fn`` L2-normalises p and t itself: a :class:`MINCLoss` with
    ``feature_norm="l2"`` (the library's default, so every ``build_loss("minc", ...)``)."""
    return isinstance(loss_fn, MINCLoss) and loss_fn.feature_norm == "l2"


def compute_loss(method: str, loss_fn: nn.Module, out: ViewOutputs, normalize: bool = False,
                 minc_ablation: str = "none") -> torch.Tensor:
    """The method's scalar loss on the two views' outputs.  ``minc_ablation="no-moment"``:
    MINC's cross-correlation term alone (the collapse study's control; M is neither used
    nor updated).  ``normalize`` (MINC): L2-normalise p and t first, unless ``loss_fn``
    does so itself (:func:`normalizes_features`): normalising unit rows again changes them
    only by rounding, so it is skipped there, and ``normalize`` acts on the no-moment
    ablation and on losses with ``feature_norm`` ``"none"`` or ``"clip"``."""
    if method == "minc":
        if normalize and minc_ablation == "none" and normalizes_features(loss_fn):
            normalize = False
        p, t = minc_pairs(out, normalize)
        if minc_ablation == "no-moment":
            return minc_no_moment_loss(p, t)
        if minc_ablation != "none":
            raise ValueError(f"minc_ablation must be one of {', '.join(MINC_ABLATIONS)}, "
                             f"got {minc_ablation!r}")
        return loss_fn(p, t)
    _check_method(method)
    return loss_fn(out.z1, out.z2)


def update_target(target: MomentumEncoder | None, step: int, total_steps: int,
                  base: float | None = None, *, backend: str = "auto",
                  check_finite: bool = True) -> float:
    """One EMA step of the target with the cosine momentum schedule (BYOL) at ``step`` of
    ``total_steps`` from ``base`` (None: :func:`minc_kernels.cosine_momentum`'s default) to 1;
    returns the momentum used (NaN without a target)."""
    if target is None:
        return float("nan")
    momentum = (cosine_momentum(step, total_steps) if base is None
                else cosine_momentum(step, total_steps, base))
    target.update(momentum, check_finite=check_finite, backend=backend)
    return momentum
