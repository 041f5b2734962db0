"""What every loss home shares: the registry's entry type and the eager building blocks
(accumulation dtype, row clipping) that more than one loss's math uses."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["LossSpec", "CheckedHyperParams", "acc", "clip_rows", "in_backward", "row_norms",
           "normalize_rows"]


@dataclass(frozen=True)
class LossSpec:
    """One loss, as the package, ``info``, the benchmarks, the sync check and the static
    suite see it (``minc_kernels.losses.REGISTRY``).

    Attributes:
        name: short name (``"spectral"``); also the ``backend`` op name when ``op`` is set.
        module: the ``nn.Module`` class; ``module_kwargs(k)`` the constructor arguments a
            generic caller needs for feature dimension ``k`` (MINC's ``dim``).
        functional: the public functional form, ``functional(a, b, ..., backend=)``.
        reference: the eager oracle, ``reference(a, b)`` at the default hyper-parameters.
        step: one training step's loss work through the public API,
            ``step(a, b, backend=..., **variant)`` (what the benchmarks time: MINC's includes
            the batch moment); ``variants`` names extra keyword sets (the spectral
            ``algorithm``s) the benchmarks and the static suite also run.
        arg_names: the two inputs' names (``("z1", "z2")``, ``("p", "t")``).
        grad_args: which of the two inputs take a gradient (MINC's target does not).
        op: ``minc_kernels.ops.<op>`` holding its Triton kernels, or None.
        cpu_fallback: what ``backend="auto"`` runs where the kernels do not (``info``).
        matmul_flops: ``(b, k) -> (fwd, bwd)`` useful matmul flops of one call (elementwise
            work not counted), for achieved TFLOP/s in the benchmarks.
        eager_alias: variants whose eager (reference) evaluation is another variant's
            (spectral ``"matrix"`` is ``"pairwise"`` in eager PyTorch): the benchmarks time
            one eager baseline for both.
    """

    name: str
    module: type
    functional: Callable
    reference: Callable
    step: Callable
    arg_names: tuple[str, str]
    grad_args: tuple[int, ...]
    op: str | None
    matmul_flops: Callable[[int, int], tuple[float, float]]
    cpu_fallback: str = "reference"
    module_kwargs: Callable[[int], dict] = field(default=lambda k: {})
    variants: dict = field(default_factory=dict)
    eager_alias: dict = field(default_factory=dict)


class CheckedHyperParams:
    """``nn.Module`` mixin: assigning an attribute named in ``_hparam_checks`` runs the
    constructor's check on the new value (``loss.mu = -1.0`` raises and keeps the old value),
    and assigning ``backend`` re-resolves the backend choice.  Put it before ``nn.Module``."""

    _hparam_checks: dict = {}

    def __setattr__(self, name: str, value) -> None:
        check = self._hparam_checks.get(name)
        if check is not None:
            value = check(value)
        if name == "backend":
            from .._backend import requested_backend

            super().__setattr__("_choice", requested_backend(value))
        super().__setattr__(name, value)


def in_backward() -> bool:
    """Whether this code runs inside autograd's backward pass: what activation checkpointing
    (both reentrant modes) does when it recomputes a forward.  Stateful losses use it to
    update their state once per step, not again in the recomputation.  Always False under
    ``torch.compile`` (TorchDynamo cannot trace the engine query)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its accumulation dtype: float32 for half types and float32, float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """``‖x_i‖`` as a (B, 1) column in ``x``'s accumulation dtype, without overflow: the sum
    of squares is accumulated in float64, so rows of fp32/bf16 entries near 1e20 (whose
    squares overflow float32) get their true, representable norm instead of inf."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float64)
    return norm if x.dtype == torch.float64 else norm.float()


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x_i / max(‖x_i‖, eps)``: ``F.normalize(x, dim=1, eps=eps)`` with the overflow-safe
    :func:`row_norms` (same value wherever ``F.normalize`` does not overflow, up to the
    rounding of a float64-accumulated norm); keeps ``x``'s dtype; differentiable."""
    return x / row_norms(x).clamp_min(eps).to(x.dtype)


def clip_rows(z: torch.Tensor, mu: float) -> torch.Tensor:
    """Rows with ``||z_i|| >= sqrt(mu)`` rescaled to norm exactly ``sqrt(mu)``; others unchanged.

    Differentiable: the rescaling's Jacobian is part of the graph.
    """
    r = math.sqrt(mu)
    norm = row_norms(z)
    # clamp_min keeps the unused branch finite for all-zero rows (norm 0 < r always).
    scale = torch.where(norm >= r, r / norm.clamp_min(1e-30), torch.ones_like(norm))
    return (acc(z) * scale).to(z.dtype)
