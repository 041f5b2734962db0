"""Loads the compiled extension (``minc_kernels._C``) once, lazily; records why it is missing.

Never compiles at import.  ``load(required=False)`` returns the module or ``None``;
``load(required=True)`` re-raises the original build/import error.

Before importing the module, the versions it was built against (``_C_build.json``,
written next to it by setup.py) are compared with the running torch: a module built
against another torch is refused with a message saying how to rebuild, instead of
failing on an undefined symbol or, worse, crashing on an ABI difference.  After the
import, ``_C.build_info()`` is compared again.

Importing this module also registers the fake (meta) implementation of the op
``minc::ema_update_`` when the op is loaded, so ``torch.compile`` can trace it (the
compiled module names this module as the op's Python home).
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


# ----------------------------------------------------------------- fake implementation
def _ema_update_fake(target, online, momentum, copy_target, copy_source) -> None:
    """Shape-level checks only (the kernels check everything again); writes nothing."""
    if len(target) != len(online) or len(copy_target) != len(copy_source):
        raise ValueError("minc::ema_update_: target/online and copy_target/copy_source must "
                         "hold the same number of tensors")
    device = None
    for name, first, second in (("online", target, online), ("copy_source", copy_target, copy_source)):
        for i, (t, o) in enumerate(zip(first, second)):
            if t.shape != o.shape:
                raise ValueError(f"minc::ema_update_: {name}[{i}] must have the shape of its "
                                 f"target: expected {tuple(t.shape)}, got {tuple(o.shape)}")
            # ema_update_ leaves the device check of its hot path to the op: a meta tensor
            # among real ones dispatches here, so this check must name it.
            device = t.device if device is None else device
            if t.device != device or o.device != device:
                raise ValueError(f"minc::ema_update_: {name}[{i}] and its target are on "
                                 f"{o.device} and {t.device}, expected {device}: one call "
                                 "updates tensors of one device")
    return None


def _register_fake() -> None:
    if _state.get("fake_registered"):
        return
    try:
        torch.ops.minc.ema_update_.with_copy  # noqa: B018 - raises if the op is not loaded
    except (AttributeError, RuntimeError):
        return
    try:
        torch.library.register_fake("minc::ema_update_.with_copy")(_ema_update_fake)
    except RuntimeError as exc:  # this module re-imported: the first registration stands
        if "already" not in str(exc):
            raise
    _state["fake_registered"] = True


_register_fake()  # the op is already loaded when torch imports this module for its fake
