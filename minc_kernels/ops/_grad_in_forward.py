"""The one autograd wiring of every scalar-loss op that computes its input gradients in the
forward pass (the spectral, MINC and MIO ops, the blocked CPU MIO op).

Such an op returns ``(loss, *grads)`` where the grads are the gradients of ``loss`` for a
unit upstream gradient, fp32, empty when the op's ``need_grad`` input is False:

* ``layout="per_input"``: one gradient per entry of ``grad_inputs`` (same shape as that input);
* ``layout="stacked"``: one ``(2B, k)`` gradient of the stacked ``[inputs[0]; inputs[1]]``.

Backward only scales the saved gradients by the upstream gradient, so there is no second
derivative: ``create_graph=True`` raises instead of returning a silent zero.  The gradients
are marked non-differentiable outputs.  Torch only (no Triton), so the CPU op uses it too.
"""
from __future__ import annotations

import torch

__all__ = ["register_grad_in_forward"]


def register_grad_in_forward(op, need_grad_index: int, what: str,
                             grad_inputs: tuple[int, ...] = (0, 1),
                             layout: str = "per_input") -> None:
    """Register that autograd on ``op`` (a ``torch.library.custom_op``).

    ``need_grad_index``: position of the op's ``need_grad`` flag among its inputs;
    ``grad_inputs``: the inputs that receive a gradient (others get None); ``what`` names the
    loss path in error messages.
    """
    if layout not in ("per_input", "stacked"):
        raise ValueError(f"layout must be 'per_input' or 'stacked', got {layout!r}")
    if layout == "stacked" and tuple(grad_inputs) != (0, 1):
        raise ValueError("layout='stacked' stacks the gradients of inputs 0 and 1")
    grad_inputs = tuple(grad_inputs)

    def setup_context(ctx, inputs, output):
        grads = output[1:]
        ctx.mark_non_differentiable(*grads)
        # the gradient outputs get no upstream gradient: without this, autograd would hand
        # backward a zero tensor of each one's size (2·B·k fp32 more at backward's peak)
        ctx.set_materialize_grads(False)
        ctx.need_grad = inputs[need_grad_index]
        ctx.n_inputs = len(inputs)
        ctx.b = inputs[0].shape[0]
        ctx.dtypes = tuple(inputs[i].dtype for i in grad_inputs)
        ctx.save_for_backward(*grads)

    def backward(ctx, grad_loss, *_grad_grads):
        saved = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[i] for i in grad_inputs]
        if not any(wanted) or grad_loss is None:
            return (None,) * ctx.n_inputs
        if not ctx.need_grad:
            raise RuntimeError(f"{what} was called with need_grad=False; its gradient was not computed")
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # the saved gradients are constants here: a second derivative would be silently zero
            raise RuntimeError(f"{what} does not support double backward (create_graph=True); "
                               "use backend='reference'")
        if layout == "stacked":
            (dz,) = saved
            grads = (dz[: ctx.b], dz[ctx.b:])
        else:
            grads = saved
        out = [None] * ctx.n_inputs
        for slot, (i, g) in enumerate(zip(grad_inputs, grads)):
            if wanted[slot]:
                out[i] = (grad_loss.to(g.dtype) * g).to(ctx.dtypes[slot])
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)
