"""The compiled extension ``minc_kernels._C`` and the Python side of its op.

Loading: once, lazily (never compiles at import); records why it is missing.
``load(required=False)`` returns the module or ``None``; ``load(required=True)``
re-raises the original build/import error.  Call ``load()`` (or
``minc_kernels.functional.load_kernels()``, or build a ``MomentumEncoder``) before
``torch.compile``: the first load reads files, which a compiled region cannot trace.

Before importing the module, the versions it was built against (``_C_build.json``,
written next to it by setup.py) are compared with the running torch: a module built
against another torch is refused with a message saying how to rebuild, instead of
failing on an undefined symbol or, worse, crashing on an ABI difference.  After the
import, ``_C.build_info()`` is compared again.

The op ``minc_kernels::ema_update_`` (the package's one op namespace, shared with the
Triton ops): its schema and kernels are C++ (``csrc/ema.cpp``: overloads ``default``,
``with_copy`` and ``tensor_momentum``); its Python side is this module (the schema names it
with ``set_python_module``): the fake (meta) implementations ``torch.compile`` traces with,
registered right after the op is loaded, by ``_register_fake`` below.  (How
``ema_update_`` applies the op to FSDP2 / DTensor parameters, on local shards, is
``minc_kernels/ema.py``.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_state: dict = {}
BUILD_RECORD = Path(__file__).with_name("_C_build.json")
REBUILD_HINT = ("rebuild it against this torch: `pip install --no-build-isolation -e .` "
                "(MINC_KERNELS_BUILD_EXT=1 makes build failures errors)")


class ExtensionMismatchError(ImportError):
    """The compiled module was built against another torch than the one running."""


def _check_versions(built: dict, where: str) -> None:
    want = built.get("torch")
    if want is not None and want != torch.__version__:
        raise ExtensionMismatchError(
            f"minc_kernels._C was built against torch {want} ({where}) but torch "
            f"{torch.__version__} is running; the C++ ABI of torch differs between versions, "
            f"so it is not loaded: {REBUILD_HINT}")


def _import():
    if BUILD_RECORD.exists():
        try:
            record = json.loads(BUILD_RECORD.read_text())
        except (OSError, ValueError):
            record = {}
        _check_versions(record, str(BUILD_RECORD))
    try:
        from . import _C  # type: ignore[attr-defined]  # built by setup.py
    except ImportError as exc:
        if "undefined symbol" in str(exc):
            raise ExtensionMismatchError(
                f"minc_kernels._C does not link against the running torch {torch.__version__} "
                f"({exc}); it was probably built against another torch: {REBUILD_HINT}") from exc
        raise
    info = dict(_C.build_info())
    _check_versions(info, "its build_info()")
    _state["info"] = info  # plain Python data: torch.compile traces supports() without a break
    _register_fake()
    return _C


def load(required: bool = False):
    if "module" not in _state:
        try:
            _state["module"], _state["error"] = _import(), None
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised on request
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            _state["module"], _state["error"] = None, exc
    if _state["module"] is None and required:
        raise RuntimeError(f"the minc_kernels C++/CUDA extension is not available: "
                           f"{_state['error']}") from _state["error"]
    return _state["module"]


def status() -> tuple[bool, str]:
    mod = load()
    if mod is None:
        return False, f"{type(_state['error']).__name__}: {_state['error']}"
    return True, "ok"


def build_info() -> dict:
    """``_C.build_info()`` (versions built against, ``cuda_compiled``), or ``{}`` if not loaded."""
    return dict(_state["info"]) if load() is not None else {}


def supports(device: torch.device) -> bool:
    """Whether the loaded extension has a kernel for tensors on ``device``."""
    device = torch.device(device)
    if load() is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and bool(_state["info"].get("cuda_compiled"))


@torch.compiler.assume_constant_result
def live(device_type: str) -> bool:
    """Whether the extension (loaded now if it was not) has a kernel for ``device_type``
    tensors.  torch.compile runs this at trace time and keeps the answer as a constant, so
    the first update in a fresh process may be compiled with fullgraph=True (the load
    reads files, which Dynamo cannot trace).  The answer is cached per device type (the hot
    path of every eager update asks)."""
    cache = _state.get("live")
    if cache is None:
        cache = _state["live"] = {}
    answer = cache.get(device_type)
    if answer is None:
        answer = cache[device_type] = load() is not None and supports(device_type)
    return answer


# ------------------------------------------------- the op minc_kernels::ema_update_: fakes
OP_NAME = "minc_kernels::ema_update_"


def _check_fake_lists(target, online, copy_target, copy_source):
    """Shape-level checks only (the kernels check everything again); returns the device."""
    if len(target) != len(online) or len(copy_target) != len(copy_source):
        raise ValueError(f"{OP_NAME}: target/online and copy_target/copy_source must "
                         "hold the same number of tensors")
    device = None
    for name, first, second in (("online", target, online), ("copy_source", copy_target, copy_source)):
        for i, (t, o) in enumerate(zip(first, second)):
            # ema_update_ leaves the device check of its hot path to the op: a meta tensor
            # among real ones dispatches here, so this check must name it.
            device = t.device if device is None else device
            if t.device != device or o.device != device:
                raise ValueError(f"{OP_NAME}: {name}[{i}] and its target are on "
                                 f"{o.device} and {t.device}, expected {device}: one call "
                                 "updates tensors of one device")
            if t.shape != o.shape:
                raise ValueError(f"{OP_NAME}: {name}[{i}] must have the shape of its "
                                 f"target: expected {tuple(t.shape)}, got {tuple(o.shape)}")
    return device


def _ema_update_fake(target, online, momentum, copy_target, copy_source) -> None:
    """``ema_update_.with_copy`` (float momentum): writes nothing."""
    _check_fake_lists(target, online, copy_target, copy_source)


def _ema_update_tensor_fake(target, online, momentum, copy_target, copy_source) -> None:
    """``ema_update_.tensor_momentum``: the momentum's shape, dtype and device, never its
    value (under torch.compile the value is not known; the CPU kernel checks it when it
    runs, a CUDA momentum is read on the device)."""
    device = _check_fake_lists(target, online, copy_target, copy_source)
    check_momentum_tensor(momentum, device)


def check_momentum_tensor(momentum: torch.Tensor, device=None) -> torch.Tensor:
    """A momentum tensor must be 0-dim float32/float64, on the CPU or ``device``: metadata
    only (no value read: no host sync, nothing for torch.compile to guard on)."""
    if momentum.dim() != 0:
        raise ValueError(f"momentum must be a float or a 0-dim tensor, got a tensor of shape "
                         f"{tuple(momentum.shape)}")
    if momentum.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"a momentum tensor must be float32 or float64, got {momentum.dtype}")
    if device is not None and momentum.device.type != "cpu" and momentum.device != device:
        raise ValueError(f"a momentum tensor must be on the CPU or on the device of the tensors "
                         f"({device}), got {momentum.device}")
    return momentum


_FAKES = (("with_copy", _ema_update_fake), ("tensor_momentum", _ema_update_tensor_fake))


def _register_fake() -> None:
    if _state.get("fake_registered"):
        return
    try:
        torch.ops.minc_kernels.ema_update_.tensor_momentum  # noqa: B018 - raises if not loaded
    except (AttributeError, RuntimeError):
        return
    for overload, fake in _FAKES:
        try:
            torch.library.register_fake(f"{OP_NAME}.{overload}")(fake)
        except RuntimeError as exc:  # this module re-imported: the first registration stands
            if "already" not in str(exc):
                raise
    _state["fake_registered"] = True


_register_fake()  # the op is already loaded when torch imports this module for its fake
