"""EMA (momentum-encoder) updates, docs/math.md §4: ``ema_update_``, ``MomentumEncoder``, schedules.

The defaults never wait on the device: arguments are checked on shapes, dtypes, devices
and layouts only.  The NaN/Inf check of the online values is opt-in (``check_finite=True``):
it reads every online value once more and syncs with the host, which costs more than the
update itself on the memory-bound CPU path (issue 13 measured 0.41x of ``_foreach_lerp_``).
"""
from __future__ import annotations

import copy
from bisect import bisect_right
from itertools import chain

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
    _check_not_swapped(targets, onlines)


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
                    and (o.requires_grad or not t.requires_grad)  # not swapped
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


def _check_not_swapped(targets: list, onlines: list) -> None:
    """The EMA copy is frozen and the trained tensors require grad: a target that requires
    grad paired with an online tensor that does not is the swapped order (lightly's
    ``update_momentum(model, model_ema, m)`` takes the trained model first; ours is
    ``(target, online, momentum)``), which would overwrite the trained weights."""
    for i, (t, o) in enumerate(zip(targets, onlines)):
        if t.requires_grad and not o.requires_grad:
            raise ValueError(f"target[{i}] requires grad but online[{i}] does not: the arguments "
                             "look swapped; the order is (target, online, momentum): the EMA copy "
                             "first (frozen), the trained tensors second (lightly's "
                             "update_momentum(model, model_ema, m) is the other way round)")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Bytes [begin, end) that ``t`` can touch (exact for dense tensors, a bound otherwise)."""
    if t.numel() == 0:
        return 0, 0
    begin = t.data_ptr()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return begin, begin + extent * t.element_size()


def _check_aliasing(targets: list, onlines: list, copy_targets: list, copy_sources: list) -> None:
    """The extension's rule (csrc/ema.cpp), for the foreach path: written tensors pairwise
    disjoint, and a written tensor overlaps no read tensor except its own partner when the
    two are the very same memory (same start, strides and dtype: a no-op).

    With the extension loaded, its C++ check (``_C.check_aliasing``, ~0.1 us per tensor).
    Otherwise one sweep over the byte spans sorted by start; only a call with an overlap
    goes on to ``_name_aliasing``, which names the pair or lets a target that is its own
    online tensor through."""
    ext = _ext.load()
    if ext is not None and hasattr(ext, "check_aliasing"):
        ext.check_aliasing(targets, onlines, copy_targets, copy_sources)
        return
    written = targets + copy_targets
    tensors = written + onlines + copy_sources
    begins = [t.data_ptr() for t in tensors]
    sizes = [t.nbytes for t in tensors]
    if not all([t.is_contiguous() for t in tensors]):  # strided views: their span, not nbytes
        sizes = [_span(t)[1] - _span(t)[0] for t in tensors]
    n_written = len(written)
    end_written = end_read = 0
    for k in sorted(range(len(tensors)), key=begins.__getitem__):
        size = sizes[k]
        if not size:
            continue
        begin = begins[k]
        if k < n_written:
            if begin < end_written or begin < end_read:
                break
            end_written = max(end_written, begin + size)
        else:
            if begin < end_written:
                break
            end_read = max(end_read, begin + size)
    else:
        return
    _name_aliasing(targets, onlines, copy_targets, copy_sources)


def _name_aliasing(targets: list, onlines: list, copy_targets: list, copy_sources: list) -> None:
    """The exact check behind ``_check_aliasing``: raises naming the pair, or returns when
    every overlap is a target that is its own partner."""
    written = [(*_span(t), "target", i, t) for i, t in enumerate(targets) if t.numel()]
    written += [(*_span(t), "copy_target", i, t) for i, t in enumerate(copy_targets) if t.numel()]
    if not written:
        return
    written.sort(key=lambda w: w[0])
    for (_, end, name, i, _t), (begin, _, name2, j, _t2) in zip(written, written[1:]):
        if begin < end:
            raise ValueError(f"{name}[{i}] and {name2}[{j}] share memory; every written tensor "
                             "must be distinct")
    # The written spans are sorted and disjoint, so their ends are sorted too: the first one
    # that can overlap a read span [b, e) is the first whose end is past b.
    ends = [w[1] for w in written]
    partner = {"online": "target", "copy_source": "copy_target"}
    for name, tensors in (("online", onlines), ("copy_source", copy_sources)):
        for j, o in enumerate(tensors):
            if not o.numel():
                continue
            begin, end = _span(o)
            k = bisect_right(ends, begin)
            while k < len(written) and written[k][0] < end:
                wb, we, wname, i, t = written[k]
                same = (wname == partner[name] and i == j and wb == begin and we == end
                        and t.dtype == o.dtype and t.stride() == o.stride())
                if not same:
                    raise ValueError(f"{wname}[{i}] (written) and {name}[{j}] (read) share memory; "
                                     "a written tensor may alias only its own partner as the very "
                                     "same tensor: crossed or partial aliasing makes the result "
                                     "depend on the order of the updates")
                k += 1


# --------------------------------------------------------------- FSDP2 / DTensor
_DTENSOR: list = []


def _dtensor_type():
    """``torch.distributed.tensor.DTensor``, imported on first need (None without it)."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except Exception:  # noqa: BLE001 - a torch without distributed support
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def _has_dtensor(*lists) -> bool:
    dt = _dtensor_type()
    return dt is not None and any(isinstance(x, dt) for lst in lists for x in lst)


def _local_pairs(first: list, second: list, names: tuple) -> tuple[list, list]:
    """Each pair as local tensors: two DTensors sharded alike (same mesh, placements and
    global shape) give their local shards, which pair element for element; two plain
    tensors stay; anything else is refused, naming the pair."""
    dt = _dtensor_type()
    a, b = names
    if len(first) != len(second):
        raise ValueError(f"{a} and {b} must hold the same number of tensors, got "
                         f"{len(first)} and {len(second)}")
    out_first, out_second = [], []
    for i, (t, o) in enumerate(zip(first, second)):
        t_d, o_d = isinstance(t, dt), isinstance(o, dt)
        if t_d and o_d:
            if t.device_mesh != o.device_mesh or t.placements != o.placements or t.shape != o.shape:
                raise ValueError(
                    f"{a}[{i}] and {b}[{i}] are DTensors sharded differently ({a}: shape "
                    f"{tuple(t.shape)}, placements {t.placements}, mesh {t.device_mesh}; {b}: "
                    f"shape {tuple(o.shape)}, placements {o.placements}, mesh {o.device_mesh}): "
                    "shard the EMA copy like the online module (the same fully_shard calls on "
                    "the same mesh), so that each rank updates its own shards")
            if a == "target":
                _check_not_swapped([t], [o])
            out_first.append(t.to_local())
            out_second.append(o.to_local())
        elif t_d or o_d:
            kinds = {True: "a DTensor (sharded)", False: "a plain torch.Tensor"}
            raise ValueError(
                f"{a}[{i}] is {kinds[t_d]} and {b}[{i}] {kinds[o_d]}: both must be DTensors "
                "sharded alike, or both plain tensors. With FSDP2, shard the EMA copy like the "
                "online module, with fully_shard(target, reshard_after_forward=True) (a root "
                "module otherwise keeps its parameters unsharded after its forward; "
                "MomentumEncoder.update reshards the target itself, outside torch.compile)")
        else:
            out_first.append(t)
            out_second.append(o)
    return out_first, out_second


def _to_local(targets, onlines, copy_targets, copy_sources):
    with torch.no_grad():  # to_local of a Parameter that requires grad: no graph
        targets, onlines = _local_pairs(targets, onlines, ("target", "online"))
        copy_targets, copy_sources = _local_pairs(copy_targets, copy_sources,
                                                  ("copy_target", "copy_source"))
    return targets, onlines, copy_targets, copy_sources


# ------------------------------------------------------------------------ the update
def ema_update_(target, online, momentum, check_finite: bool = False,
                backend: str = "auto") -> None:
    """In place, for every pair: ``target ← momentum·target + (1-momentum)·online`` (fp32 math).

    Args:
        target: the EMA copy: tensors to update (floating; fp32 recommended: bf16 rounds
            small updates away), dense (contiguous or channels_last), all on one device; or
            an ``nn.Module``, meaning its ``parameters()``.  FSDP2 (``fully_shard``) /
            DTensor parameters are updated shard by shard (each rank its local shards) when
            target and online are sharded alike; otherwise a ``ValueError`` names the pair.
        online: the trained tensors (or an ``nn.Module``): the same shapes, strides and
            device (any floating dtype, e.g. bf16 into fp32).  The order is (target, online),
            the opposite of lightly's ``update_momentum(model, model_ema, m)``: a target that
            requires grad paired with an online tensor that does not is refused as swapped.
        momentum: in [0, 1]; 1 keeps ``target``, 0 copies ``online``.  A float, or a 0-dim
            float32/float64 tensor (a schedule under ``torch.compile`` then compiles once:
            nothing is guarded on its value).  A float or a CPU tensor is range-checked
            (a CPU tensor when the update runs, never while tracing); a momentum tensor on
            the GPU is read on the device and checked only with ``check_finite=True``
            (reading it is a host sync).
        check_finite: opt-in: refuse NaN/Inf in ``online`` (and a GPU momentum tensor out
            of range) with a ``ValueError`` before writing anything (an extra read of
            ``online`` and one host sync per call).  Default False: no value is read on
            the host, so NaN/Inf online values reach the targets (a diverged online network
            shows in its loss first).
        backend: ``"auto"``: the compiled extension ``torch.ops.minc_kernels.ema_update_``
            when built for the tensors' device (one call; its checks run in C++, ~0.1 us
            per tensor), otherwise ``torch._foreach_lerp_`` (checks in Python first).
            ``"extension"`` (re-raises why it is missing) or ``"foreach"``.  Every backend
            refuses aliasing in eager mode: written tensors sharing memory, or a target
            sharing memory with any online tensor but its own partner as the very same
            tensor (under ``torch.compile`` data pointers are not known while tracing, and
            the compiled op may run on functionalized copies: aliasing is not checked
            there; the argument order is, while tracing).
    """
    if isinstance(target, nn.Module) or isinstance(online, nn.Module):
        target, online = _module_parameters(target, online)
    _ema_update(list(target), list(online), momentum, check_finite, backend)


def _module_parameters(target, online) -> tuple[list, list]:
    """Modules mean their parameters (lightly's ``update_momentum`` does the same; the
    buffers, e.g. BN statistics, are MomentumEncoder's business)."""
    if not (isinstance(target, nn.Module) and isinstance(online, nn.Module)):
        raise TypeError(f"target and online must both be nn.Modules or both sequences of tensors, "
                        f"got {type(target).__name__} and {type(online).__name__}")
    return list(target.parameters()), list(online.parameters())


def _ema_update(targets: list, onlines: list, momentum, check_finite: bool, backend: str,
                copy_targets: list = (), copy_sources: list = ()) -> None:
    """ema_update_ plus ``copy_targets[j] ← copy_sources[j]`` (same dtype, shape, layout and
    device as the lerped tensors), in one extension call if live."""
    if isinstance(momentum, torch.Tensor):
        momentum = _ext.check_momentum_tensor(momentum)  # metadata only: no guard, no sync
    else:
        momentum = check_unit_interval("momentum", momentum)
    check_choice("backend", backend, EMA_BACKENDS)
    copy_targets, copy_sources = list(copy_targets), list(copy_sources)
    first = (targets or copy_targets or [None])[0]
    if first is not None and type(first) not in _PLAIN_TYPES and _has_dtensor([first]):
        # FSDP2 / DTensor parameters: the same update on each rank's local shards.
        targets, onlines, copy_targets, copy_sources = _to_local(targets, onlines, copy_targets,
                                                                 copy_sources)
        first = (targets or copy_targets or [None])[0]
    if backend != "foreach":
        if isinstance(first, torch.Tensor) and _ext.live(first.device.type):
            if torch.compiler.is_compiling():
                # Tracing: the op may run on functionalized copies that no longer require
                # grad, so its C++ order check would not see a swap: check the metadata here
                # (at trace time only: nothing of it runs per compiled call).
                _check_not_swapped(targets, onlines)
            if check_finite:  # opt-in: the checks first (the finite check needs them), then values
                _check_lists(targets, onlines, layout=True)
                with torch.no_grad():
                    _check_finite(onlines)
                    _check_momentum_value(momentum)
            # The hot path: no check in Python.  The op checks every pair in C++ (devices
            # first, then the momentum, shapes, dtypes, layouts, the argument order, and
            # aliasing) before writing anything and raises a ValueError/TypeError naming the
            # tensor: ~0.1 us per tensor, where the same checks in Python cost ~2-5 us per
            # tensor (measured: benchmarks/results/cpu-overhead-*).  A tensor of another
            # device sends the call to that device's kernel, or to the fake implementation
            # (meta), which check devices too.
            try:
                if isinstance(momentum, float):
                    torch.ops.minc_kernels.ema_update_.with_copy(targets, onlines, momentum,
                                                                 copy_targets, copy_sources)
                else:
                    torch.ops.minc_kernels.ema_update_.tensor_momentum(
                        targets, onlines, momentum, copy_targets, copy_sources)
            except (TypeError, RuntimeError):
                # torch's argument parser refuses a list with a non-tensor item with a
                # RuntimeError that names no item: name it (the op's own checks raise
                # ValueError/TypeError, already named; anything else is re-raised).  A
                # DTensor after the first tensor (the op has no sharding rule: it runs on
                # local shards) is redone on the local shards, or refused naming the pair.
                for lst, name in ((targets, "target"), (onlines, "online"),
                                  (copy_targets, "copy_target"), (copy_sources, "copy_source")):
                    _check_tensors(lst, name)
                if _has_dtensor(targets, onlines, copy_targets, copy_sources):
                    _ema_update(*_to_local(targets, onlines, [], [])[:2], momentum, check_finite,
                                backend, *_to_local([], [], copy_targets, copy_sources)[2:])
                    return
                _check_lists(targets, onlines, layout=True)
                raise
            return
        _ext.load(required=backend == "extension")  # "extension": why it is missing
        if backend == "extension" and isinstance(first, torch.Tensor):
            raise RuntimeError(f"the minc_kernels extension has no kernel for {first.device} "
                               f"tensors (built with {_ext.build_info()}); rebuild it with CUDA "
                               "(CUDA_HOME set, MINC_KERNELS_BUILD=cuda) or use backend='foreach'")
    # torch._foreach_lerp_: checks in Python first (bulk comparisons; the detailed loop only
    # to name the culprit), so that a bad call leaves every target untouched.
    if _distributed() and _has_dtensor(targets, onlines, copy_targets, copy_sources):
        targets, onlines, copy_targets, copy_sources = _to_local(targets, onlines, copy_targets,
                                                                 copy_sources)
    if check_finite or not _quick_valid(targets, onlines):
        _check_lists(targets, onlines, layout=backend == "extension")
    if not torch.compiler.is_compiling():  # data pointers: not traceable
        _check_aliasing(targets, onlines, copy_targets, copy_sources)
    if isinstance(momentum, torch.Tensor):
        momentum = _foreach_momentum(momentum, first, check_finite)
    # no_grad here, not around the whole call: on the extension's path (not differentiable,
    # its Autograd kernel only dispatches) the context manager measurably slowed the call.
    with torch.no_grad():
        if check_finite:
            _check_finite(onlines)
        if targets:
            _foreach_ema(targets, onlines, momentum)
        if copy_targets:
            torch._foreach_copy_(copy_targets, copy_sources)


def _foreach_ema(targets: list, onlines: list, momentum) -> None:
    if isinstance(momentum, float):
        if _same_dtypes(targets, onlines):
            torch._foreach_lerp_(targets, onlines, 1.0 - momentum)
        else:
            reference.ema_update_(targets, onlines, momentum)  # upcasts the online tensors
        return
    # A 0-dim tensor momentum: lerp weights as tensors (no value read on the host).
    onlines = [o if o.dtype == t.dtype else o.to(t.dtype) for t, o in zip(targets, onlines)]
    weights = {}
    for t in targets:
        if (t.dtype, t.device) not in weights:
            w = 1.0 - momentum.to(device=t.device, dtype=torch.float64)
            weights[t.dtype, t.device] = w.to(t.dtype)
    torch._foreach_lerp_(targets, onlines, [weights[t.dtype, t.device] for t in targets])


def _foreach_momentum(momentum: torch.Tensor, first, check_finite: bool):
    """The foreach path's tensor momentum.  Eagerly, a CPU tensor is read (host memory: no
    device sync), range-checked and used as a float, which also spares a GPU update a
    host-to-device copy; a GPU tensor is used as it is, range-checked only with
    check_finite=True.  Under torch.compile it stays a tensor and is not read."""
    _ext.check_momentum_tensor(momentum, first.device if isinstance(first, torch.Tensor) else None)
    if torch.compiler.is_compiling():
        return momentum
    if momentum.device.type == "cpu":
        _check_momentum_value(momentum)
        return float(momentum)
    if check_finite:
        _check_momentum_value(momentum)
    return momentum


def _check_momentum_value(momentum) -> None:
    if isinstance(momentum, torch.Tensor):
        value = float(momentum)  # CPU memory, or check_finite=True: a read the caller accepted
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {value!r}")


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

    FSDP2 (``fully_shard``) modules cannot be deep-copied: build the copy like the online
    module, shard it the same way, and pass it as ``target``
    (``MomentumEncoder(online, target=fully_shard(build(), reshard_after_forward=True))``);
    its weights are then set from ``online``'s, shard by shard, and ``update`` works on
    the local shards (docs/distributed.md, "FSDP2").

    Args:
        online: the module being trained.
        ema_buffers: lerp floating buffers (BN running stats) like parameters (default
            True); if False they are copied.  Integer buffers are always copied.
        target: optional: the module to hold the EMA copy instead of a deep copy of
            ``online``: the same parameters and buffers (names, order, shapes; DTensors
            sharded like the online ones).  Its values are overwritten with ``online``'s
            and its parameters stop requiring grad.
    """

    def __init__(self, online: nn.Module, ema_buffers: bool = True, target: nn.Module | None = None):
        super().__init__()
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be an nn.Module, got {type(online).__name__}")
        if target is None:
            try:
                target = copy.deepcopy(online)
            except Exception as exc:
                if _is_sharded(online):
                    raise TypeError(
                        "online is sharded (FSDP2 fully_shard / DTensor parameters) and cannot "
                        "be deep-copied: build the EMA copy like the online module, shard it the "
                        "same way and pass it: MomentumEncoder(online, target=fully_shard("
                        "build(), reshard_after_forward=True)); its weights are then copied "
                        "from online") from exc
                raise
        else:
            if not isinstance(target, nn.Module):
                raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
            if target is online:
                raise ValueError("target must be another module than online (the EMA copy)")
            _copy_weights_(target, online)
        for p in target.parameters():
            p.requires_grad_(False)
        self.target = target
        self.ema_buffers = bool(ema_buffers)
        # Not registered as a submodule: the caller owns (and optimises) the online module.
        object.__setattr__(self, "_online", online)
        # FSDP2 modules in the copy: resharded before each update (outside torch.compile).
        object.__setattr__(self, "_fsdp_modules", _fsdp_modules(target))
        # Load the compiled extension now, outside any compiled region: update() can then
        # be compiled with fullgraph=True in a fresh process.
        _ext.load()

    @property
    def online(self) -> nn.Module:
        return self._online

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.target(*args, **kwargs)

    def update(self, momentum, check_finite: bool = False, backend: str = "auto") -> None:
        """One EMA step of parameters (and buffers) with ``momentum`` in [0, 1]: a float, or
        a 0-dim tensor (under ``torch.compile`` a schedule then compiles once).

        With the compiled extension live, parameters, lerped buffers and copied buffers
        are all updated by one call of ``torch.ops.minc_kernels.ema_update_``;
        ``check_finite`` (opt-in, a host sync) and ``backend`` are those of :func:`ema_update_`.
        FSDP2 modules of the target are resharded first (eager only: under torch.compile,
        shard the target with ``reshard_after_forward=True``).
        """
        if not isinstance(momentum, torch.Tensor):
            momentum = check_unit_interval("momentum", momentum)
        if self._fsdp_modules and not torch.compiler.is_compiling():
            for m in self._fsdp_modules:
                m.reshard()
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


def _distributed() -> bool:
    """A process group is up (DTensors need one): the only case where DTensors can appear."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_sharded(module: nn.Module) -> bool:
    """An FSDP2 module, or one with DTensor parameters (torch.distributed in use only)."""
    if not _distributed():
        return False
    return bool(_fsdp_modules(module)) or _has_dtensor(list(module.parameters()))


def _fsdp_modules(module: nn.Module) -> tuple:
    """The FSDP2 (``fully_shard``) modules in ``module`` (none without a process group)."""
    if not _distributed():
        return ()
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return ()
    return tuple(m for m in module.modules() if isinstance(m, FSDPModule))


def _copy_weights_(target: nn.Module, online: nn.Module) -> None:
    """``target``'s parameters and buffers ← ``online``'s (DTensors: shard by shard)."""
    tp, tb = _params_and_buffers(target)
    op, ob = _params_and_buffers(online)
    if len(tp) != len(op) or len(tb) != len(ob):
        raise ValueError(f"target must have the parameters and buffers of online: got {len(tp)} "
                         f"parameters and {len(tb)} buffers, online has {len(op)} and {len(ob)}")
    for kind, ts, os_ in (("parameter", tp, op), ("buffer", tb, ob)):
        for i, (t, o) in enumerate(zip(ts, os_)):
            if t.shape != o.shape:
                raise ValueError(f"target's {kind} {i} has shape {tuple(t.shape)} but online's "
                                 f"{tuple(o.shape)}: build the target like the online module")
    for m in _fsdp_modules(target):
        m.reshard()
    with torch.no_grad():
        if _has_dtensor(tp, op, tb, ob):
            tp, op = _local_pairs(tp, op, ("target parameter", "online parameter"))
            tb, ob = _local_pairs(tb, ob, ("target buffer", "online buffer"))
        for t, o in zip(tp + tb, op + ob):
            t.copy_(o)
