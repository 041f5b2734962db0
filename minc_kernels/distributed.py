"""Autograd-correct collectives for data-parallel training (docs/math.md §5).

The rule every distributed loss here follows
--------------------------------------------
DDP runs ``loss.backward()`` on every rank and then *averages* the parameter
gradients over the W ranks.  Write ``L_r`` for the loss that rank r returns.  The
collectives below have backwards that *sum* over ranks, so rank r's autograd
produces its share of ``∇(Σ_r L_r)`` (the terms that flow through its own
samples), and DDP's average turns the sum of those shares into
``∇((1/W) Σ_r L_r)``.  The spectral and MIO losses return the *global* loss, the
same value on every rank (``L_r = L``), hence DDP applies exactly ``∇L``: the
gradient of one process holding the whole global batch.

* :func:`all_reduce_sum`: forward ``y = Σ_r x_r``; backward ``∂/∂x_r = Σ_r' g_r'``
  (an all-reduce of the incoming gradients).  When every rank computes the same
  function of ``y``, all ``g_r'`` are equal and the backward is ``W·g``: the factor W
  that DDP's ``1/W`` cancels.  An identity backward (a common bug) leaves the
  update W times too small.
* :func:`all_gather`: forward ``y = cat_r x_r`` along dim 0 (local sizes may
  differ); backward: the sum over ranks of the incoming gradients, then the local
  slice (a reduce-scatter).  Keeping only the local slice of the local gradient
  (another common bug) drops every other rank's contribution.

``torch.distributed.nn.functional.all_reduce`` (SUM) and ``all_gather`` have the
same backward semantics in torch 2.x (all-reduce of the gradients; reduce-scatter
emulated by all-to-all on non-NCCL backends); the tests check that ours agrees.
Ours add unequal local sizes, a single packed output tensor, and no-ops outside
a process group.

Every function is a no-op (returns its input, or the trivial answer) when
``torch.distributed`` is unavailable, not initialised, or the group has one rank.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

try:
    import torch.distributed as dist

    _AVAILABLE = dist.is_available()
except ImportError:  # pragma: no cover - builds without distributed support
    dist = None
    _AVAILABLE = False

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "all_reduce_sum",
    "all_gather",
    "gather_sizes",
    "sync_buffers_",
]


# --------------------------------------------------------------------------- helpers
def _initialised() -> bool:
    return _AVAILABLE and dist.is_initialized()


def world_size(group=None) -> int:
    """Ranks in ``group`` (default: the world), 1 when not running distributed."""
    return dist.get_world_size(group) if _initialised() else 1


def rank(group=None) -> int:
    """This process's rank in ``group``, 0 when not running distributed."""
    return dist.get_rank(group) if _initialised() else 0


def is_distributed(group=None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return world_size(group) > 1


# torch >= 2.12 renamed the single-tensor collectives (the old names warn); 2.11 has only the old.
_all_gather_single = (getattr(dist, "all_gather_single", None)
                      or getattr(dist, "all_gather_into_tensor", None))
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or getattr(dist, "reduce_scatter_tensor", None))


def gather_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's local size ``n`` (one tiny all-gather; a host sync on CUDA).

    Under ``torch.compile`` the sizes cannot be read back to the host inside the graph:
    the static-size mode then assumes every rank holds ``n`` rows (equal local batches, as
    ``DistributedSampler`` with ``drop_last=True`` gives) and exchanges nothing; unequal
    local batches under compile make the collectives fail or hang (docs/distributed.md).
    """
    if not is_distributed(group):
        return [int(n)]
    w = world_size(group)
    if torch.compiler.is_compiling():
        return [int(n)] * w
    mine = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = torch.empty(w, dtype=torch.int64, device=device)
    _all_gather_single(out, mine, group=group)
    return [int(v) for v in out.tolist()]


# --------------------------------------------------------------------------- all-reduce
class _AllReduceSum(torch.autograd.Function):
    """``y = Σ_r x_r``; backward ``Σ_r g_r`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``, differentiable (backward: sum of gradients).

    Returns a new tensor (``x`` is not modified); ``x`` itself when not distributed.
    Under ``torch.no_grad`` it is a plain all-reduce.
    """
    if not is_distributed(group):
        return x
    return _AllReduceSum.apply(x, group)


# --------------------------------------------------------------------------- all-gather
class _AllGather(torch.autograd.Function):
    """``y = cat_r x_r`` (dim 0, sizes may differ); backward: reduce-scatter (sum) of ``g``."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        w = len(sizes)
        r = dist.get_rank(group)
        m = max(sizes)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, r
        x = x.contiguous()
        if x.shape[0] < m:  # collectives need equal sizes: pad to the largest local size
            pad = x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))
            x = torch.cat([x, pad], dim=0)
        out = x.new_empty((w * m,) + tuple(x.shape[1:]))
        _all_gather_single(out, x, group=group)
        if all(s == m for s in sizes):
            return out
        return torch.cat([out[i * m: i * m + s] for i, s in enumerate(sizes)], dim=0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        sizes, r = ctx.sizes, ctx.rank
        m, w = max(sizes), len(sizes)
        grad = grad.contiguous()
        if all(s == m for s in sizes):
            padded = grad
        else:
            padded = grad.new_zeros((w * m,) + tuple(grad.shape[1:]))
            start = 0
            for i, s in enumerate(sizes):
                padded[i * m: i * m + s] = grad[start: start + s]
                start += s
        if _reduce_scatter_single is not None:
            out = grad.new_empty((m,) + tuple(grad.shape[1:]))
            _reduce_scatter_single(out, padded, op=dist.ReduceOp.SUM, group=ctx.group)
        else:  # pragma: no cover - very old torch: all-reduce, then keep the local block
            out = padded.clone()
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
            out = out[r * m: (r + 1) * m]
        return out[: sizes[r]], None, None


def all_gather(x: torch.Tensor, group=None, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenation over ranks (in rank order) of every rank's ``x`` along dim 0, differentiable.

    ``x`` is (n_r, ...) with the same trailing shape, dtype and device on every rank;
    ``n_r`` may differ between ranks.  ``sizes`` (every rank's ``n_r``) skips the size
    exchange when the caller knows them.  Backward: the gradient of the concatenation
    summed over ranks, local rows kept (a reduce-scatter).  Returns ``x`` itself when
    not distributed.
    """
    if not is_distributed(group):
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    sizes = [int(s) for s in sizes]
    if len(sizes) != world_size(group):
        raise ValueError(f"sizes must hold one entry per rank ({world_size(group)}), "
                         f"got {len(sizes)}")
    if sizes[rank(group)] != x.shape[0]:
        raise ValueError(f"sizes[{rank(group)}] = {sizes[rank(group)]} does not match this rank's "
                         f"x.shape[0] = {x.shape[0]}")
    return _AllGather.apply(x, group, sizes)


# --------------------------------------------------------------------------- buffers
@torch.no_grad()
def sync_buffers_(module: torch.nn.Module, op: str = "mean", src: int = 0,
                  group=None) -> torch.nn.Module:
    """Make ``module``'s buffers equal on every rank, in place; returns ``module``.

    Why: DDP keeps *parameters* identical, but BatchNorm running statistics are updated
    from each rank's local batch during the forward (DDP re-broadcasts rank 0's at the
    next forward only), so a :class:`~minc_kernels.MomentumEncoder` that averages buffers
    drifts apart across ranks.  Call this on ``encoder.target`` after ``update()`` (or use
    ``nn.SyncBatchNorm`` in the online network, which makes the statistics global).

    ``op="mean"``: floating buffers are averaged over ranks (one all-reduce per dtype);
    ``op="broadcast"``: rank ``src``'s floating buffers are copied (DDP's convention).
    Non-floating buffers (``num_batches_tracked``) are always broadcast from ``src``
    (a global rank).  A no-op when not distributed.
    """
    if op not in ("mean", "broadcast"):
        raise ValueError(f"op must be 'mean' or 'broadcast', got {op!r}")
    if not is_distributed(group):
        return module
    buffers = [b for b in module.buffers()]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for b in buffers:
        floating = b.is_floating_point() and op == "mean"
        groups.setdefault((floating, b.dtype, b.device), []).append(b)
    w = world_size(group)
    for (floating, _, _), bs in groups.items():
        flat = torch.cat([b.reshape(-1) for b in bs])
        if floating:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(w)
        else:
            dist.broadcast(flat, src=src, group=group)
        start = 0
        for b in bs:
            b.copy_(flat[start: start + b.numel()].view_as(b))
            start += b.numel()
    return module
