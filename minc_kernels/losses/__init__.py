"""One home per loss (``<loss>.py``: the module, the functional form, the dispatch and the
eager math it is checked against) and :data:`REGISTRY`, the one list of losses that the
package, ``python -m minc_kernels.info``, the benchmarks, the sync check and the static
sm_90 suite read.

Adding a loss: write its home with a ``SPEC`` (:class:`LossSpec`), add it to the tuple
below and export its names from ``minc_kernels/__init__.py``; kernels go in
``minc_kernels/ops/<op>.py`` (launchers, ``torch.library`` ops) and
``minc_kernels/kernels/`` (``@triton.jit`` code).
"""
from __future__ import annotations

from . import barlow_twins, minc, mio, spectral, vicreg
from ._common import LossSpec
from .barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from .minc import MINC_DEFAULT_FEATURE_NORM, MINCLoss, minc_loss, minc_moment_sum
from .mio import MIOLoss, mio_loss
from .spectral import SpectralContrastiveLoss, spectral_contrastive_loss
from .vicreg import VICRegLoss, vicreg_loss

__all__ = ["REGISTRY", "LossSpec", "SpectralContrastiveLoss", "MINCLoss", "MIOLoss",
           "spectral_contrastive_loss", "minc_loss", "minc_moment_sum", "mio_loss",
           "MINC_DEFAULT_FEATURE_NORM", "BarlowTwinsLoss", "barlow_twins_loss", "VICRegLoss",
           "vicreg_loss"]

#: name -> :class:`LossSpec`, in the order tables list them.
REGISTRY: dict[str, LossSpec] = {s.name: s for s in (spectral.SPEC, minc.SPEC, mio.SPEC,
                                                  barlow_twins.SPEC, vicreg.SPEC)}
