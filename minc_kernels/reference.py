"""The eager oracles, gathered in one namespace: each loss's math lives in its home
(:mod:`minc_kernels.losses`); the EMA oracle lives here.

Everything is plain differentiable PyTorch (except MINC's ``gha`` custom backward, which is
not the gradient of a scalar).  No input validation happens here.  Precision convention
(shared by every backend): matmuls run in the input's storage dtype as eager PyTorch would;
reductions and the returned loss are float32 (float64 for float64 inputs, so that gradcheck
can run on the references).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .losses._common import acc, clip_rows
from .losses.barlow_twins import barlow_twins_loss_reference as barlow_twins_loss
from .losses.minc import FEATURE_NORMS as MINC_FEATURE_NORMS
from .losses.minc import (
    all_finite,
    minc_batch_moment_sum,
    minc_bilinear,
    minc_corrected_moment,
    minc_ema_moment,
    minc_features,
    minc_loss_divisor,
    minc_moment_update,
    minc_moment_update_,
)
from .losses.minc import minc_loss_reference as minc_loss
from .losses.mio import mio_loss_reference as mio_loss
from .losses.spectral import spectral_gram_term, spectral_pairwise_term
from .losses.spectral import spectral_loss_reference as spectral_loss
from .losses.vicreg import vicreg_loss_reference as vicreg_loss

__all__ = [
    "acc",
    "clip_rows",
    "spectral_loss",
    "spectral_pairwise_term",
    "spectral_gram_term",
    "MINC_FEATURE_NORMS",
    "minc_features",
    "minc_loss",
    "minc_loss_divisor",
    "minc_bilinear",
    "minc_batch_moment_sum",
    "minc_moment_update",
    "minc_moment_update_",
    "minc_corrected_moment",
    "minc_ema_moment",
    "all_finite",
    "mio_loss",
    "barlow_twins_loss",
    "vicreg_loss",
    "ema_update_",
    "cosine_momentum",
]


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
