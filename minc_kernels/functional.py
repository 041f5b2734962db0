"""The public functional forms, gathered from the loss homes (:mod:`minc_kernels.losses`),
and :func:`load_kernels`.

Each function validates its arguments, chooses the backend once per call
(:mod:`minc_kernels._backend`) and runs.  Return dtype: float32 for float32/bfloat16/float16
inputs (matmuls in the input's dtype, reductions in float32), float64 for float64 inputs.

The op modules import lazily on first use; TorchDynamo cannot trace that import, so before
calling these functions inside ``torch.compile(fullgraph=True)`` call :func:`load_kernels`
once (the loss modules do it in their constructors).
"""
from __future__ import annotations

from . import _ext
from ._backend import preload, requested_backend
from .losses import REGISTRY
from .losses.barlow_twins import barlow_twins_loss
from .losses.minc import minc_loss, minc_moment_sum
from .losses.mio import mio_loss
from .losses.spectral import spectral_contrastive_loss, spectral_dist_comm_choice
from .losses.vicreg import vicreg_loss

__all__ = [
    "spectral_contrastive_loss",
    "minc_loss",
    "minc_moment_sum",
    "mio_loss",
    "barlow_twins_loss",
    "vicreg_loss",
    "load_kernels",
    "spectral_dist_comm_choice",
]


def load_kernels(backend: str | None = None) -> None:
    """Import the Triton ops now (outside any compiled region) if ``backend`` may use them,
    and load the compiled EMA extension (a no-op where it was not built).

    A no-op for ``backend="reference"`` and on machines without CUDA (unless
    ``TRITON_INTERPRET=1``); an unavailable op is remembered and reported when requested.
    """
    choice = requested_backend(backend)
    for spec in REGISTRY.values():
        if spec.op is not None:
            preload(spec.op, choice)
    _ext.load()  # the EMA extension too: its first load reads files, which compile cannot trace
