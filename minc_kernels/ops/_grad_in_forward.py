"""The one autograd wiring of every scalar-loss op that computes its input gradients in the
forward pass (the spectral, MINC and MIO ops, the blocked CPU MIO op).

Such an op returns ``(loss, *grads)`` where the grads are the gradients of ``loss`` for a
unit upstream gradient, fp32, empty when the op's ``need_grad`` input is False:

* ``layout="per_input"``: one gradient per entry of ``grad_inputs`` (same shape as that input);
* ``layout="stacked"``: one ``(2B, k)`` gradient of the stacked ``[inputs[0]; inputs[1]]``.

Backward only scales the saved gradients by the upstream gradient, so there is no second
derivative: ``create_graph=True`` raises instead of returning a silent zero.  The gradients
are marked non-differentiable outputs.  Torch only (no Triton), so the CPU op uses it too.

Two ways in, one body and one backward: :func:`register_grad_in_forward` registers the
autograd on the ``torch.library`` op (what ``torch.compile``/``torch.export`` trace, and what
``opcheck`` checks) and returns a callable that, in eager mode, runs the op's body under a
``torch.autograd.Function`` with the same ``setup_context`` and ``backward`` instead.  The
custom op's Python dispatch and its registered autograd cost host time a training step
pays on every call: about 70 µs of 220 µs per spectral fwd+bwd at 16×16 on the 2-core CPU
machine (launches stubbed, benchmarks/cpu_host_overhead.py), and the H200 visit measured
0.21 ms for an empty custom op's fwd+bwd against a 0.25 ms target for the whole loss.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["register_grad_in_forward", "eager_or_op"]


def register_grad_in_forward(op, need_grad_index: int, what: str,
                             grad_inputs: tuple[int, ...] = (0, 1),
                             layout: str = "per_input",
                             body: Callable | None = None) -> Callable:
    """Register that autograd on ``op`` (a ``torch.library.custom_op``); return the callable
    the API functions use: ``op`` itself while compiling/exporting, and in eager mode
    ``body`` (the op's implementation, same arguments and outputs) under an
    ``autograd.Function`` with the same backward (``op`` when no ``body`` is given).

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
        out = [None] * ctx.n_inputs
        if layout == "stacked":
            (dz,) = saved
            if all(wanted) and ctx.dtypes[0] == ctx.dtypes[1]:
                # both halves in one op: one kernel, and one buffer whose halves are the
                # two gradients (views; autograd accepts them as they are)
                both = _scaled(dz, grad_loss, ctx.dtypes[0])
                out[0], out[1] = both[: ctx.b], both[ctx.b:]
                return tuple(out)
            grads = (dz[: ctx.b], dz[ctx.b:])
        else:
            grads = saved
        for slot, (i, g) in enumerate(zip(grad_inputs, grads)):
            if wanted[slot]:
                out[i] = _scaled(g, grad_loss, ctx.dtypes[slot])
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)
    if body is None:
        return op

    class Eager(torch.autograd.Function):
        # the op's own context and backward.  An old-style Function (ctx in forward): the
        # new-style one with a setup_context staticmethod cost ~45 µs more per fwd+bwd on
        # the CPU machine (torch 2.14, spectral 16×16: 205 against 160 µs)
        @staticmethod
        def forward(ctx, *inputs):
            output = body(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, grad_loss, *grad_grads):
            return backward(ctx, grad_loss, *grad_grads)

    name = getattr(op, "_name", "op").split("::")[-1]
    Eager.__name__ = Eager.__qualname__ = f"{name}_eager"
    call = eager_or_op(op, Eager.apply)
    call.function = Eager
    return call


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_loss * grad`` (fp32 ``grad``, 0-dim fp32 ``grad_loss``) rounded to ``dtype``, in
    one op: the product is formed in fp32 and rounded once on store, the bits of
    ``(grad_loss * grad).to(dtype)``, in one kernel (not a multiply then a cast) that reads
    fp32 and writes ``dtype`` (6 bytes an element for bf16 rows where the two ops moved 14)."""
    return torch.mul(grad, grad_loss, out=grad.new_empty(grad.shape, dtype=dtype))


def eager_or_op(op, eager: Callable) -> Callable:
    """``f(*inputs)``: ``eager(*inputs)`` for plain, non-meta tensors outside
    ``torch.compile``/``torch.export``, else ``op(*inputs)`` (traced through its fake; meta,
    fake and subclass tensors such as DTensor go through the op's dispatch).  The first input
    decides (a tensor, or a list of tensors)."""
    tensor = torch.Tensor
    is_compiling = torch.compiler.is_compiling

    def call(*inputs):
        first = inputs[0]
        if isinstance(first, (list, tuple)):
            first = first[0]
        if is_compiling() or type(first) is not tensor or first.is_meta:
            return op(*inputs)
        return eager(*inputs)

    call.__name__ = f"{getattr(op, '_name', 'op').split('::')[-1]}_call"
    call.op = op
    return call
