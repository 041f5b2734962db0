"""minc_kernels: fused kernels for spectral-contrastive and mutual-information SSL losses.

Public API::

    MINCLoss, SpectralContrastiveLoss, MIOLoss                 # nn.Modules
    BarlowTwinsLoss, VICRegLoss    # drop-ins for lightly's losses
    spectral_contrastive_loss, minc_loss, minc_moment_sum, mio_loss   # functional
    barlow_twins_loss, vicreg_loss
    load_kernels                   # import the Triton ops before torch.compile(fullgraph=True)
    ema_update_, MomentumEncoder, cosine_momentum             # momentum encoders

Each loss lives in ``minc_kernels/losses/<loss>.py``; ``minc_kernels.losses.REGISTRY`` lists them.
"""
from .ema import MomentumEncoder, cosine_momentum, ema_update_
from .functional import load_kernels
from .losses import (
    BarlowTwinsLoss,
    MINCLoss,
    MIOLoss,
    SpectralContrastiveLoss,
    VICRegLoss,
    barlow_twins_loss,
    minc_loss,
    minc_moment_sum,
    mio_loss,
    spectral_contrastive_loss,
    vicreg_loss,
)

__version__ = "0.1.0"

__all__ = [
    "MINCLoss",
    "SpectralContrastiveLoss",
    "MIOLoss",
    "spectral_contrastive_loss",
    "minc_loss",
    "minc_moment_sum",
    "mio_loss",
    "BarlowTwinsLoss",
    "VICRegLoss",
    "barlow_twins_loss",
    "vicreg_loss",
    "load_kernels",
    "ema_update_",
    "MomentumEncoder",
    "cosine_momentum",
]
