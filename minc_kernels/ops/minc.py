"""MINC launchers and ``torch.library`` ops (docs/math.md §2).

Ops (namespace ``minc_kernels``):

* ``minc_loss_fwd(p, t, moment, gha, need_grad) -> (loss, grad_p)``: one fused pass
  (:func:`minc_kernels.ops.gram.rowmat`, the shared Gram layer) gives the loss partials and, when
  ``need_grad``, the fp32 gradient ``(2/B)(M p_i - t_i)`` (``gha``: ``LT(M)``) for a unit
  upstream gradient; backward only scales it.  ``grad_p`` is empty without ``need_grad``
  and is a non-differentiable output.
* ``minc_moment_sum(t) -> Σ_j t_j t_jᵀ`` (fp32 k×k, split over row slices, slices summed
  in a fixed order).

Inputs are validated by :mod:`minc_kernels.functional`; any strides are accepted.
``tl.dot`` precision: fp32 inputs ``"ieee"``; bf16 ``p`` × fp32 ``M`` as three bf16 dots
(``M`` split hi/mid/lo); fp16 ``p`` × ``M`` as two TF32 dots (``M`` split hi/lo); ``tᵀt``
in the storage dtype (fp32: ``"ieee"``), fp32 accumulation everywhere.  Deterministic:
no atomics, partial buffers reduced by ``torch.sum`` in a fixed order.

Double backward is not supported: backward scales a saved, non-differentiable gradient,
so second derivatives through these ops would come out as zero (use the reference).
"""
from __future__ import annotations

import torch

from ._grad_in_forward import register_grad_in_forward
from .gram import gram, rowmat

__all__ = ["minc_loss", "moment_sum", "minc_loss_fwd", "minc_moment_sum", "minc_forward"]


def minc_forward(p: torch.Tensor, t: torch.Tensor, moment: torch.Tensor, gha: bool,
                 need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of :func:`minc_loss_fwd` (plain function: the static sm_90 suite calls it
    on meta tensors, which the custom op would send to its fake)."""
    b = p.shape[0]
    quad, cross, grad = rowmat(p, moment, t, None, 2.0 / b, -2.0 / b, 0.0, gha, need_grad)
    loss = (quad - 2.0 * cross) / b
    if grad is None:
        grad = p.new_empty((0,), dtype=torch.float32)
    return loss, grad


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("minc_kernels::minc_loss_fwd", mutates_args=())
def minc_loss_fwd(p: torch.Tensor, t: torch.Tensor, moment: torch.Tensor, gha: bool,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, dL/dp)`` with ``L = (1/B) Σ_i [-2 p_i·t_i + p_iᵀ M p_i]`` (fp32 scalar) and
    ``dL/dp = (2/B)(P Mᵀ - T)`` (``gha``: ``LT(M)``), fp32 (B, k); (0,) without ``need_grad``."""
    return minc_forward(p, t, moment, gha, need_grad)


@minc_loss_fwd.register_fake
def _minc_loss_fwd_fake(p, t, moment, gha, need_grad):
    shape = tuple(p.shape) if need_grad else (0,)
    return p.new_empty((), dtype=torch.float32), p.new_empty(shape, dtype=torch.float32)


_minc_loss = register_grad_in_forward(minc_loss_fwd, need_grad_index=4, grad_inputs=(0,),
                                      what="minc_kernels::minc_loss_fwd", body=minc_forward)


@torch.library.custom_op("minc_kernels::minc_moment_sum", mutates_args=())
def minc_moment_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ``: fp32 (k, k)."""
    return gram(t)


@minc_moment_sum.register_fake
def _minc_moment_sum_fake(t):
    k = t.shape[1]
    return t.new_empty((k, k), dtype=torch.float32)


# ----------------------------------------------------------------------------- API
def minc_loss(p: torch.Tensor, t: torch.Tensor, moment: torch.Tensor, ordering: str) -> torch.Tensor:
    """Fp32 scalar ``(1/B) Σ_i [-2 p_i·t_i + p_iᵀ M p_i]``; gradient only wrt ``p``."""
    need_grad = torch.is_grad_enabled() and p.requires_grad
    loss, _ = _minc_loss(p, t.detach(), moment.detach().float(), ordering == "gha", need_grad)
    return loss


def moment_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` as fp32 (k, k), no gradient."""
    return minc_moment_sum(t.detach())
