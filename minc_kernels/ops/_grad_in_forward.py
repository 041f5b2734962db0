"""Autograd for scalar-loss ops that compute their input gradient in the forward pass.

Such an op is ``op(z1, z2, *scalars, need_grad, *more) -> (loss, dz)`` with ``dz`` the
gradient of ``loss`` wrt the stacked ``[z1; z2]`` ((2B, k), or empty when ``need_grad`` is
False).  Backward only scales ``dz`` by the upstream gradient, so there is no second
derivative: ``create_graph=True`` raises instead of returning a silent zero.  Torch only
(no Triton), so the CPU op can use it too.
"""
from __future__ import annotations

import torch


def register_grad_in_forward(op, need_grad_index: int, what: str) -> None:
    """Register that autograd on ``op`` (a ``torch.library.custom_op``); ``what`` names the
    loss path in error messages."""

    def setup_context(ctx, inputs, output):
        _, dz = output
        ctx.need_grad = inputs[need_grad_index]
        ctx.n_inputs = len(inputs)
        ctx.b = inputs[0].shape[0]
        ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
        ctx.save_for_backward(dz)

    def backward(ctx, grad_loss, grad_dz):
        (dz,) = ctx.saved_tensors
        if not ctx.need_grad:
            raise RuntimeError(f"{what} was called with need_grad=False; its gradient was not computed")
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # dz is a constant here: a second derivative through it would be silently zero.
            raise RuntimeError(f"{what} does not support double backward (create_graph=True); "
                               "use backend='reference'")
        b = ctx.b
        g = grad_loss.to(dz.dtype)
        grad_z1 = (g * dz[:b]).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_z2 = (g * dz[b:]).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return (grad_z1, grad_z2) + (None,) * (ctx.n_inputs - 2)

    op.register_autograd(backward, setup_context=setup_context)
