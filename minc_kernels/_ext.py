"""Loads the compiled extension (``minc_kernels._C``) once, lazily; records why it is missing.

Never compiles at import.  ``load(required=False)`` returns the module or ``None``;
``load(required=True)`` re-raises the original build/import error.
"""
from __future__ import annotations

_state: dict = {}


def load(required: bool = False):
    if "module" not in _state:
        try:
            from . import _C  # type: ignore[attr-defined]  # built by setup.py
            _state["module"], _state["error"] = _C, None
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
