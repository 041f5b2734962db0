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

MINCLoss's default step (feature map ``"l2"``, kernels in :mod:`minc_kernels.kernels.minc`):

* ``minc_l2_rows(x) -> x̂``: the targets' l2 map (no gradient).
* ``minc_moment_update_(hats, moment, num_updates, skips, beta, update, check, bias) -> M_c``:
  the mapped targets' batch moment (:func:`gram`), and with ``update`` the moment's EMA
  step in place (skipped on the device when C is not finite and ``check``); returns the
  bias-corrected moment (empty without bias correction); mutates ``moment``,
  ``num_updates``, ``skips``.  :func:`moment_step` chains the two.
* ``minc_l2_loss_fwd(p, t_hat, moment, gha, need_grad) -> (loss, grad_p)``: ``p``'s l2 map,
  the loss of :func:`minc_loss_fwd` on it and the gradient chained through the map, in
  the forward (fp32, never rounded to ``p``'s dtype in between).

Double backward is not supported: backward scales a saved, non-differentiable gradient,
so second derivatives through these ops would come out as zero (use the reference).
"""
from __future__ import annotations

import math

import torch

from ..kernels.minc import l2_rows_backward_kernel, l2_rows_kernel, moment_ema_kernel
from . import configs
from ._common import cdiv, device_guard, upcast_bf16_dot
from ._grad_in_forward import eager_or_op, register_grad_in_forward
from .gram import gram, gram_slices, rowmat_value

__all__ = ["minc_loss", "moment_sum", "minc_loss_fwd", "minc_moment_sum", "minc_forward",
           "l2_rows", "l2_rows_backward_", "moment_ema_", "moment_update_body", "moment_step",
           "moment_step_body", "minc_l2_rows", "minc_moment_update_",
           "minc_l2_forward", "minc_l2_loss", "L2_EPS"]

#: MINC's l2 map: ``x / max(‖x‖, L2_EPS)`` (losses.minc.l2_rows, F.normalize's eps).
L2_EPS = 1e-12


def minc_forward(p: torch.Tensor, t: torch.Tensor, moment: torch.Tensor, gha: bool,
                 need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of :func:`minc_loss_fwd` (plain function: the static sm_90 suite calls it
    on meta tensors, which the custom op would send to its fake)."""
    b = p.shape[0]
    loss, grad = rowmat_value(p, moment, t, 2.0 / b, -2.0 / b, gha, need_grad, 1.0 / b, -2.0 / b)
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


_moment_sum = eager_or_op(minc_moment_sum, gram)  # eager: no custom-op dispatch


def moment_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ_j t_j t_jᵀ`` as fp32 (k, k), no gradient."""
    return _moment_sum(t.detach())


# ----------------------------------------------------------------------------- MINCLoss step
def l2_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂, denom)``: the l2-mapped rows (contiguous, ``x``'s dtype) and their fp32
    denominators ``max(‖x_i‖, eps) + 0·‖x_i‖`` (NaN for a row that is not finite or whose fp32
    sum of squares overflows: that row of ``x̂`` is NaN)."""
    b, k = x.shape
    cfg = configs.l2_rows_config(b, k)
    out = torch.empty((b, k), dtype=x.dtype, device=x.device)
    denom = torch.empty((b,), dtype=torch.float32, device=x.device)
    with device_guard(x):
        l2_rows_kernel[(cdiv(b, cfg["BLOCK_R"]),)](
            x, out, denom, b, k, x.stride(0), x.stride(1), EPS=L2_EPS,
            INTERP_BF16=upcast_bf16_dot(x.dtype), **cfg)
    return out, denom


def l2_rows_backward_(x: torch.Tensor, denom: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """In place on the contiguous fp32 ``g`` (gradient wrt ``x̂``): the gradient wrt ``x``."""
    b, k = x.shape
    cfg = configs.l2_rows_config(b, k)
    with device_guard(x):
        l2_rows_backward_kernel[(cdiv(b, cfg["BLOCK_R"]),)](
            x, denom, g, b, k, x.stride(0), x.stride(1), EPS=L2_EPS, **cfg)
    return g


def moment_ema_(moment: torch.Tensor, num_updates: torch.Tensor, skips: torch.Tensor,
                c_sum: torch.Tensor | None, rows: int, beta: float, update: bool, check: bool,
                bias: bool) -> torch.Tensor | None:
    """With ``update``: ``M ← lerp(M, C/rows, 1-β)`` in place and ``num_updates += 1``,
    or (``check`` and C not finite) M and ``num_updates`` unchanged and ``skips += 1``, all
    on the device.  Returns the bias-corrected ``M / max(1 - β^n, 1 - β)`` (a new fp32
    tensor) when ``bias`` and β > 0, else None (the loss reads ``moment`` itself).
    ``c_sum``: C itself, fp32 (k, k), or contiguous (S, k, k) partials that the kernel adds
    in order (a Gram's row slices).  ``check`` relies on C being the moment of l2-mapped
    rows (kernels/minc.py)."""
    bias = bool(bias) and beta > 0.0
    if not update and not bias:
        return None
    n = moment.numel()
    out = torch.empty_like(moment) if bias else moment
    new_nu = torch.empty((), dtype=torch.int64, device=moment.device)
    block = configs.MOMENT_EMA_BLOCK
    with device_guard(moment):
        moment_ema_kernel[(cdiv(n, block),)](
            c_sum if update else moment, moment, out, num_updates, skips, new_nu, n,
            c_sum.shape[0] if update and c_sum.dim() == 3 else 1, float(max(rows, 1)),
            1.0 - beta, math.log(beta) if beta > 0.0 else 0.0, 1.0 - beta,
            UPDATE=bool(update), CHECK=bool(check), BIAS=bias, BLOCK=block, num_warps=4,
        )
    if update:  # the new count, written by the kernel's first program (skips: in place)
        num_updates.copy_(new_nu)
    return out if bias else None


def moment_update_body(hats: list[torch.Tensor], moment: torch.Tensor,
                       num_updates: torch.Tensor, skips: torch.Tensor, beta: float,
                       update: bool, check: bool, bias: bool) -> torch.Tensor:
    """The body of ``minc_moment_update_``: with ``update`` the batch moment of the mapped
    targets ``hats`` and the EMA step (:func:`moment_ema_`); returns the bias-corrected M,
    or an empty tensor without bias correction (β = 0 or ``bias`` False: M itself is it)."""
    c = None
    if update:  # the targets' Grams as row slices, summed by the EMA kernel (no torch op)
        k = moment.shape[0]
        parts = [gram_slices(hats[i:i + 2]).view(-1, k, k) for i in range(0, len(hats), 2)]
        c = parts[0] if len(parts) == 1 else torch.cat(parts)
    m = moment_ema_(moment, num_updates, skips, c, sum(h.shape[0] for h in hats), beta,
                    update, check, bias)
    return moment.new_empty((0,)) if m is None else m


@torch.library.custom_op("minc_kernels::minc_moment_update_",
                         mutates_args=("moment", "num_updates", "skips"))
def minc_moment_update_(hats: list[torch.Tensor], moment: torch.Tensor,
                        num_updates: torch.Tensor, skips: torch.Tensor, beta: float,
                        update: bool, check: bool, bias: bool) -> torch.Tensor:
    """MINCLoss's moment step on l2-mapped targets (module docstring)."""
    return moment_update_body(hats, moment, num_updates, skips, beta, update, check, bias)


@minc_moment_update_.register_fake
def _minc_moment_update_fake(hats, moment, num_updates, skips, beta, update, check, bias):
    return torch.empty_like(moment) if (bias and beta > 0.0) else moment.new_empty((0,))


@torch.library.custom_op("minc_kernels::minc_l2_rows", mutates_args=())
def minc_l2_rows(x: torch.Tensor) -> torch.Tensor:
    """MINC's l2 map of the rows of ``x`` (no gradient: for the targets)."""
    return l2_rows(x)[0]


@minc_l2_rows.register_fake
def _minc_l2_rows_fake(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


_l2_map = eager_or_op(minc_l2_rows, lambda x: l2_rows(x)[0])
_moment_update = eager_or_op(minc_moment_update_, moment_update_body)


def _step(ts, moment, num_updates, skips, beta, update, check, bias, l2, moment_update):
    hats = [l2(t) for t in ts]
    m = moment_update(hats, moment, num_updates, skips, beta, update, check, bias)
    return [m, *hats] if (bias and beta > 0.0) else hats


def moment_step(ts: list[torch.Tensor], moment: torch.Tensor, num_updates: torch.Tensor,
                skips: torch.Tensor, beta: float, update: bool, check: bool,
                bias: bool) -> list[torch.Tensor]:
    """MINCLoss's moment step: ``[M_c, *t̂]`` with bias correction (β > 0), else ``t̂`` (the
    loss then reads ``moment``): the targets' l2 map, and with ``update`` their batch moment
    and the EMA step in place (``check``: skipped on the device when C is not finite)."""
    return _step(ts, moment, num_updates, skips, beta, update, check, bias, _l2_map,
                 _moment_update)


def moment_step_body(ts, moment, num_updates, skips, beta, update, check, bias):
    """:func:`moment_step` through the launchers only (the static sm_90 suite's meta tensors
    would send the ops to their fakes)."""
    return _step(ts, moment, num_updates, skips, beta, update, check, bias,
                 lambda x: l2_rows(x)[0], moment_update_body)


def minc_l2_forward(p: torch.Tensor, t_hat: torch.Tensor, moment: torch.Tensor, gha: bool,
                    need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of ``minc_l2_loss_fwd``: the l2 map of ``p``, the fused loss on it, and the
    map's Jacobian applied to the fp32 gradient in place."""
    p_hat, denom = l2_rows(p)
    loss, grad = minc_forward(p_hat, t_hat, moment, gha, need_grad)
    if need_grad:
        l2_rows_backward_(p, denom, grad)
    return loss, grad


@torch.library.custom_op("minc_kernels::minc_l2_loss_fwd", mutates_args=())
def minc_l2_loss_fwd(p: torch.Tensor, t_hat: torch.Tensor, moment: torch.Tensor, gha: bool,
                     need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, dL/dp)`` of MINC on ``p̂ = l2(p)`` and already mapped targets ``t_hat``."""
    return minc_l2_forward(p, t_hat, moment, gha, need_grad)


@minc_l2_loss_fwd.register_fake
def _minc_l2_loss_fwd_fake(p, t_hat, moment, gha, need_grad):
    return _minc_loss_fwd_fake(p, t_hat, moment, gha, need_grad)


_minc_l2_loss = register_grad_in_forward(minc_l2_loss_fwd, need_grad_index=4, grad_inputs=(0,),
                                         what="minc_kernels::minc_l2_loss_fwd",
                                         body=minc_l2_forward)


def minc_l2_loss(p: torch.Tensor, t_hat: torch.Tensor, moment: torch.Tensor,
                 ordering: str) -> torch.Tensor:
    """Fp32 scalar MINC loss of ``l2(p)`` against mapped targets; gradient only wrt ``p``."""
    need_grad = torch.is_grad_enabled() and p.requires_grad
    loss, _ = _minc_l2_loss(p, t_hat, moment, ordering == "gha", need_grad)
    return loss

