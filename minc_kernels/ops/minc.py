"""MINC launchers and ``torch.library`` ops (SPEC §2).

Ops (namespace ``minc_kernels``):

* ``minc_loss_fwd(p, t, moment, gha, need_grad) -> (loss, grad_p)``: one fused pass
  (:func:`~minc_kernels.kernels.minc.rowmat_kernel`) gives the loss partials and, when
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
import triton

from ..kernels.minc import moment_partial_kernel, rowmat_kernel
from ._common import (device_guard, interpreting, is_fp32, next_pow2, num_sms, rhs_f32_mode,
                      upcast_bf16_dot)

__all__ = ["minc_loss", "moment_sum", "minc_loss_fwd", "minc_moment_sum", "rowmat", "gram", "gram_dot"]


# ----------------------------------------------------------------------------- launchers
def _rowmat_config(k: int, for_device: bool = False) -> dict:
    if interpreting() and not for_device:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4)
    # 8 warps: with 4, the GHA variant (two accumulators) spills registers on sm_90
    # (checked with ptxas through triton.compile for GPUTarget("cuda", 90, 32)).
    return dict(BLOCK_M=64, BLOCK_N=min(64, max(16, next_pow2(k))),
                BLOCK_K=min(32, max(16, next_pow2(k))), num_warps=8, num_stages=3)


def rowmat(x: torch.Tensor, g: torch.Tensor, y: torch.Tensor, d: torch.Tensor | None,
           alpha: float, beta: float, gamma: float, gha: bool, need_grad: bool):
    """``Q = X Gᵀ`` fused: returns ``(Σ x∘q, Σ x∘y, out)`` with ``out = α·Q' + (β + γ·d)·y``
    (fp32 (B, k), ``Q'`` = ``X LT(G)ᵀ`` with ``gha``) or ``None`` without ``need_grad``."""
    b, k = x.shape
    cfg = _rowmat_config(k)
    grid = (triton.cdiv(b, cfg["BLOCK_M"]), triton.cdiv(k, cfg["BLOCK_N"]))
    part = torch.empty(grid[0] * grid[1], 2, dtype=torch.float32, device=x.device)
    out = torch.empty((b, k) if need_grad else (1, 1), dtype=torch.float32, device=x.device)
    d_arg = d if d is not None else part
    with device_guard(x):
        rowmat_kernel[grid](
            x, g, y, d_arg, out, part, b, k,
            x.stride(0), x.stride(1), g.stride(0), g.stride(1), y.stride(0), y.stride(1),
            out.stride(0), out.stride(1),
            float(alpha), float(beta), float(gamma),
            NEED_GRAD=bool(need_grad), GHA=bool(gha), HAS_D=d is not None,
            MODE=rhs_f32_mode(x.dtype), UPCAST=upcast_bf16_dot(x.dtype), **cfg,
        )
    sums = part.sum(dim=0)
    return sums[0], sums[1], (out if need_grad else None)


def _gram_config(k: int, dtype: torch.dtype, for_device: bool = False) -> dict:
    if interpreting() and not for_device:
        return dict(BLOCK_K=16, BLOCK_B=16, num_warps=4)
    return dict(BLOCK_K=min(64, max(16, next_pow2(k))), BLOCK_B=32 if is_fp32(dtype) else 64,
                num_warps=4, num_stages=3)


def _gram_launch(x: torch.Tensor, other: torch.Tensor | None):
    b, k = x.shape
    cfg = _gram_config(k, x.dtype)
    nk = triton.cdiv(k, cfg["BLOCK_K"])
    nb = triton.cdiv(b, cfg["BLOCK_B"])
    tiles = nk * (nk + 1) // 2
    # Enough programs to fill the device; the slices' partials are summed afterwards.
    split = max(1, min(nb, triton.cdiv(2 * num_sms(x.device), tiles)))
    rows_per_split = triton.cdiv(nb, split) * cfg["BLOCK_B"]
    split = triton.cdiv(b, rows_per_split)
    if other is None:
        out = torch.empty(split, k, k, dtype=torch.float32, device=x.device)
    else:
        out = torch.zeros(split * nk * nk, dtype=torch.float32, device=x.device)
    with device_guard(x):
        moment_partial_kernel[(nk, nk, split)](
            x, out, other if other is not None else out, b, k, x.stride(0), x.stride(1),
            rows_per_split, IS_FP32=is_fp32(x.dtype), UPCAST=upcast_bf16_dot(x.dtype),
            DOT_WITH_OTHER=other is not None, **cfg,
        )
    return out, split


def gram(x: torch.Tensor) -> torch.Tensor:
    """``Xᵀ X`` = ``Σ_j x_j x_jᵀ`` as fp32 (k, k), from the storage dtype of ``x``."""
    out, split = _gram_launch(x, None)
    return out[0] if split == 1 else out.sum(dim=0)


def gram_dot(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``<other, Xᵀ X>_F`` (fp32 scalar) for a symmetric contiguous fp32 (k, k) ``other``,
    without writing ``Xᵀ X``."""
    out, _ = _gram_launch(x, other.contiguous())
    return out.sum()


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("minc_kernels::minc_loss_fwd", mutates_args=())
def minc_loss_fwd(p: torch.Tensor, t: torch.Tensor, moment: torch.Tensor, gha: bool,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, dL/dp)`` with ``L = (1/B) Σ_i [-2 p_i·t_i + p_iᵀ M p_i]`` (fp32 scalar) and
    ``dL/dp = (2/B)(P Mᵀ - T)`` (``gha``: ``LT(M)``), fp32 (B, k); (0,) without ``need_grad``."""
    b = p.shape[0]
    quad, cross, grad = rowmat(p, moment, t, None, 2.0 / b, -2.0 / b, 0.0, gha, need_grad)
    loss = (quad - 2.0 * cross) / b
    if grad is None:
        grad = p.new_empty((0,), dtype=torch.float32)
    return loss, grad


@minc_loss_fwd.register_fake
def _minc_loss_fwd_fake(p, t, moment, gha, need_grad):
    shape = tuple(p.shape) if need_grad else (0,)
    return p.new_empty((), dtype=torch.float32), p.new_empty(shape, dtype=torch.float32)


def _minc_setup_context(ctx, inputs, output):
    p = inputs[0]
    need_grad = inputs[4]
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.need_grad = need_grad
    ctx.p_dtype = p.dtype
    ctx.save_for_backward(grad)


def _minc_backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    grad_p = None
    if ctx.needs_input_grad[0]:
        if not ctx.need_grad:
            raise RuntimeError("minc_kernels::minc_loss_fwd was called with need_grad=False; "
                               "it has no gradient to return")
        grad_p = (grad_loss * grad).to(ctx.p_dtype)
    return grad_p, None, None, None, None


minc_loss_fwd.register_autograd(_minc_backward, setup_context=_minc_setup_context)


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
    loss, _ = minc_loss_fwd(p, t.detach(), moment.detach().float(), ordering == "gha", need_grad)
    return loss


def moment_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` as fp32 (k, k), no gradient."""
    return minc_moment_sum(t.detach())
