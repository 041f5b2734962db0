"""minc_kernels: fused kernels for spectral-contrastive and mutual-information SSL losses.

Public API::

    MINCLoss, SpectralContrastiveLoss, MIOLoss                 # nn.Modules
    spectral_contrastive_loss, minc_loss, minc_moment_sum, mio_loss   # functional
    load_kernels                   # import the Triton ops before torch.compile(fullgraph=True)
    ema_update_, MomentumEncoder, cosine_momentum             # momentum encoders
"""
from .ema import MomentumEncoder, cosine_momentum, ema_update_
from .functional import load_kernels, minc_loss, minc_moment_sum, mio_loss, spectral_contrastive_loss
from .losses import MINCLoss, MIOLoss, SpectralContrastiveLoss

__version__ = "0.1.0"

__all__ = [
    "MINCLoss",
    "SpectralContrastiveLoss",
    "MIOLoss",
    "spectral_contrastive_loss",
    "minc_loss",
    "minc_moment_sum",
    "mio_loss",
    "load_kernels",
    "ema_update_",
    "MomentumEncoder",
    "cosine_momentum",
]
