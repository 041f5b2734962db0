"""EMA (momentum-encoder) updates, docs/math.md §4: ``ema_update_``, ``MomentumEncoder``, schedules.

The defaults never wait on the device: arguments are checked on shapes, dtypes, devices
and layouts only.  The NaN/Inf check of the online values is opt-in (``check_finite=True``):
it reads every online value once more and syncs with the host, which costs more than the
update itself on the memory-bound CPU path (issue 13 measured 0.41x of ``_foreach_lerp_``).
"""
from __future__ import annotations

import copy
from itertools import chain
from typing import Sequence

import torch
from torch import nn

from . import _ext
from . import reference
from ._validation import check_choice, check_unit_interval

__all__ = ["ema_update_", "MomentumEncoder", "cosine_momentum"]

cosine_momentum = reference.cosine_momentum

EMA_BACKENDS = ("auto", "extension", "foreach")


def _same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both dense (contiguous in some dimension order, e.g. channels_last) with the same
    strides wherever a dimension has more than one element: element k of one's memory
    pairs with element k of the other's, which is what the fused kernels rely on."""
    if not (_is_dense(a) and _is_dense(b)):
        return False
    return a.numel() == 0 or all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _is_dense(t: torch.Tensor) -> bool:
    """No gaps and no overlap: the strides, sorted, are the running products of the sizes."""
    if t.numel() <= 1:
        return True
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1),
                               key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_layout(t: torch.Tensor, o: torch.Tensor, t_name: str, o_name: str) -> None:
    if not _same_dense_layout(t, o):
        raise ValueError(f"{t_name} and {o_name} must be dense (contiguous, or channels_last "
                         f"like parameters) with the same strides, got strides {t.stride()} and "
                         f"{o.stride()}; pass .contiguous() tensors, not strided views")


def _check_lists(targets: list, onlines: list, layout: bool = True) -> None:
    """Every check before anything is written (a bad call leaves every target untouched).

    ``layout``: also require dense, identically strided pairs (what the extension's flat
    kernels need; ``torch._foreach_lerp_`` handles any strides)."""
    if len(targets) != len(onlines):
        raise ValueError(f"target and online must hold the same number of tensors, got "
                         f"{len(targets)} and {len(onlines)}")
    for i, (t, o) in enumerate(zip(targets, onlines)):
        if not isinstance(t, torch.Tensor) or not isinstance(o, torch.Tensor):
            raise TypeError(f"target[{i}] and online[{i}] must be tensors, got "
                            f"{type(t).__name__} and {type(o).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"target[{i}] must be a floating tensor to be averaged, got dtype {t.dtype}")
        if not o.is_floating_point():
            raise TypeError(f"online[{i}] must be a floating tensor, got dtype {o.dtype}")
        if t.shape != o.shape:
            raise ValueError(f"online[{i}] must have the shape of target[{i}]: expected "
                             f"{tuple(t.shape)}, got {tuple(o.shape)}")
        if t.device != o.device:
            raise ValueError(f"online[{i}] must be on the device of target[{i}]: expected "
                             f"{t.device}, got {o.device}")
        if t.device != targets[0].device:
            raise ValueError(f"target[{i}] is on {t.device} but target[0] on {targets[0].device}; "
                             "one call updates tensors of one device")
        if layout:
            _check_layout(t, o, f"target[{i}]", f"online[{i}]")


def _same_dtypes(targets: list, onlines: list) -> bool:
    """Every pair holds one dtype (anything malformed: False, left to the full checks)."""
    try:
        return len(targets) == len(onlines) and all(t.dtype == o.dtype for t, o in zip(targets, onlines))
    except AttributeError:
        return False


def _quick_valid(targets: list, onlines: list) -> bool:
    """True when every pair passes ``_check_lists(..., layout=False)``, by bulk comparisons
    (about a third cheaper per tensor than the detailed loop, which runs on False)."""
    try:
        if len(targets) != len(onlines):
            return False
        if [t.shape for t in targets] != [o.shape for o in onlines]:
            return False
        if not all([t.is_floating_point() and o.is_floating_point()
                    for t, o in zip(targets, onlines)]):
            return False
        return len({t.device for t in targets}.union([o.device for o in onlines])) <= 1
    except AttributeError:
        return False


def _all_finite(tensors: list) -> bool:
    if not tensors:
        return True
    norms = torch._foreach_norm([o.float() if o.dtype == torch.float16 else o for o in tensors])
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def ema_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], momentum: float,
                check_finite: bool = False, backend: str = "auto") -> None:
    """In place, for every pair: ``target ← momentum·target + (1-momentum)·online`` (fp32 math).

    Args:
        target: tensors to update (floating; fp32 recommended: bf16 rounds small updates away),
            dense (contiguous or channels_last), all on one device.
        online: tensors of the same shapes, strides and device (any floating dtype, e.g. bf16
            into fp32).
        momentum: in [0, 1]; 1 keeps ``target``, 0 copies ``online``.
        check_finite: opt-in: refuse NaN/Inf in ``online`` with a ``ValueError`` before
            writing anything (an extra read of ``online`` and one host sync per call).
            Default False: no value is read on the host, so NaN/Inf online values reach
            the targets (a diverged online network shows in its loss first).
        backend: ``"auto"``: the compiled extension ``torch.ops.minc.ema_update_`` when built
            for the tensors' device (one call; its checks run in C++, ~0.1 us per tensor),
            otherwise ``torch._foreach_lerp_`` (checks in Python first).  ``"extension"``
            (re-raises why it is missing) or ``"foreach"``.
    """
    _ema_update(list(target), list(online), momentum, check_finite, backend)


def _ema_update(targets: list, onlines: list, momentum: float, check_finite: bool, backend: str,
                copy_targets: list = (), copy_sources: list = ()) -> None:
    """ema_update_ plus ``copy_targets[j] ← copy_sources[j]`` (same dtype, shape, layout and
    device as the lerped tensors), in one extension call if live."""
    momentum = check_unit_interval("momentum", momentum)
    check_choice("backend", backend, EMA_BACKENDS)
    copy_targets, copy_sources = list(copy_targets), list(copy_sources)
    first = (targets or copy_targets or [None])[0]
    if backend != "foreach":
        ext = _ext.load(required=backend == "extension")
        if ext is not None and isinstance(first, torch.Tensor) and _ext.supports(first.device):
            if check_finite:  # opt-in: the checks first (the finite check needs them), then values
                _check_lists(targets, onlines, layout=True)
                with torch.no_grad():
                    _check_finite(onlines)
            # The hot path: no check in Python.  The op checks every pair in C++ (shapes,
            # dtypes, one device, layouts, no aliasing) before writing anything and raises a
            # ValueError/TypeError naming the tensor: ~0.1 us per tensor, where the same checks
            # in Python cost ~2-5 us per tensor (measured: benchmarks/results/cpu-overhead-*).
            # A tensor of another device sends the call to that device's kernel, or to the
            # fake implementation (meta), which check devices too.
            try:
                torch.ops.minc.ema_update_.with_copy(targets, onlines, momentum, copy_targets,
                                                     copy_sources)
            except (TypeError, RuntimeError):
                # torch's argument parser refuses a list with a non-tensor item with a
                # RuntimeError that names no item: name it (the op's own checks raise
                # ValueError/TypeError, already named; anything else is re-raised).
                _check_lists(targets, onlines, layout=True)
                _check_tensors(copy_targets, "copy_target")
                _check_tensors(copy_sources, "copy_source")
                raise
            return
        if backend == "extension" and isinstance(first, torch.Tensor):
            raise RuntimeError(f"the minc_kernels extension has no kernel for {first.device} "
                               f"tensors (built with {_ext.build_info()}); rebuild it with CUDA "
                               "(CUDA_HOME set, MINC_KERNELS_BUILD=cuda) or use backend='foreach'")
    # torch._foreach_lerp_: checks in Python first (bulk comparisons; the detailed loop only
    # to name the culprit), so that a bad call leaves every target untouched.
    if check_finite or not _quick_valid(targets, onlines):
        _check_lists(targets, onlines, layout=backend == "extension")
    # no_grad here, not around the whole call: on the extension's path (not differentiable,
    # its Autograd kernel only dispatches) the context manager measurably slowed the call.
    with torch.no_grad():
        if check_finite:
            _check_finite(onlines)
        if targets:
            if _same_dtypes(targets, onlines):
                torch._foreach_lerp_(targets, onlines, 1.0 - momentum)
            else:
                reference.ema_update_(targets, onlines, momentum)  # upcasts the online tensors
        if copy_targets:
            torch._foreach_copy_(copy_targets, copy_sources)


def _check_tensors(tensors: list, name: str) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")


def _check_finite(onlines: list) -> None:
    if not _all_finite(onlines):
        raise ValueError("online holds NaN or Inf values; no target was changed "
                         "(check_finite=True was passed; the default does not read values)")


class MomentumEncoder(nn.Module):
    """An EMA copy of an online module (BYOL/MINC target network).

    ``MomentumEncoder(online)`` deep-copies ``online`` into ``self.target`` (no grads);
    ``update(momentum)`` moves the copy towards the online weights; calling the encoder
    runs the target under ``no_grad``.  Only the target is in ``state_dict``: the online
    module stays owned by the caller.

    Args:
        online: the module being trained.
        ema_buffers: lerp floating buffers (BN running stats) like parameters (default
            True); if False they are copied.  Integer buffers are always copied.
    """

    def __init__(self, online: nn.Module, ema_buffers: bool = True):
        super().__init__()
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be an nn.Module, got {type(online).__name__}")
        self.target = copy.deepcopy(online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.ema_buffers = bool(ema_buffers)
        # Not registered as a submodule: the caller owns (and optimises) the online module.
        object.__setattr__(self, "_online", online)

    @property
    def online(self) -> nn.Module:
        return self._online

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.target(*args, **kwargs)

    def update(self, momentum: float, check_finite: bool = False, backend: str = "auto") -> None:
        """One EMA step of parameters (and buffers) with ``momentum`` in [0, 1].

        With the compiled extension live, parameters, lerped buffers and copied buffers
        are all updated by one call of ``torch.ops.minc.ema_update_.with_copy``;
        ``check_finite`` (opt-in, a host sync) and ``backend`` are those of :func:`ema_update_`.
        """
        momentum = check_unit_interval("momentum", momentum)
        tp, tb = _params_and_buffers(self.target)
        op, ob = _params_and_buffers(self._online)
        if len(tp) != len(op) or len(tb) != len(ob):
            raise ValueError("the online module's parameters/buffers no longer match the target's "
                             f"({len(op)} vs {len(tp)} parameters, {len(ob)} vs {len(tb)} buffers)")
        lerp_t, lerp_o = tp, op
        # Copies the fused call can do (same dtype and layout, on the device of the update);
        # any other (a dtype cast, a strided buffer) is done by copy_ after it.
        device = (tp or tb or [None])[0]
        device = device.device if device is not None else None
        fused_t, fused_o, late = [], [], []
        for i, (t, o) in enumerate(zip(tb, ob)):
            if self.ema_buffers and t.is_floating_point():
                lerp_t.append(t)
                lerp_o.append(o)
                continue
            if t.shape != o.shape or t.device != o.device:
                raise ValueError(f"buffer {i} of the online module does not match the target "
                                 f"(shape {tuple(o.shape)} vs {tuple(t.shape)}, device "
                                 f"{o.device} vs {t.device})")
            # (num_batches_tracked: one element, always dense; the layout check is skipped)
            if t.dtype == o.dtype and t.device == device and (t.numel() <= 1 or _same_dense_layout(t, o)):
                fused_t.append(t)
                fused_o.append(o)
            else:
                late.append((t, o))
        _ema_update(lerp_t, lerp_o, momentum, check_finite, backend, fused_t, fused_o)
        if late:
            with torch.no_grad():
                for t, o in late:
                    t.copy_(o)


def _params_and_buffers(module: nn.Module) -> tuple[list, list]:
    """``list(module.parameters()), list(module.buffers())``: the same tensors in the same
    order (pre-order over the submodules, each module, parameter and buffer once), without
    the qualified names those build: one Python step per submodule, the tensors gathered and
    de-duplicated at C speed (``dict.fromkeys``: tensors hash by identity)."""
    modules, seen, stack = [], set(), [module]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        modules.append(m)
        stack.extend(reversed(m._modules.values()))
    params = dict.fromkeys(chain.from_iterable([m._parameters.values() for m in modules]))
    buffers = dict.fromkeys(chain.from_iterable([m._buffers.values() for m in modules]))
    params.pop(None, None)
    buffers.pop(None, None)
    return list(params), list(buffers)
