"""Which implementation runs a loss: the Triton kernels or the eager reference.

``backend`` (argument) or ``MINC_KERNELS_BACKEND`` (env var) is one of:

* ``"auto"`` (default): the Triton kernels for CUDA tensors when Triton and the op
  are available, the reference otherwise (always on the CPU);
* ``"triton"``: the kernels, or a clear error saying why they cannot run.  On the
  CPU this needs ``TRITON_INTERPRET=1`` (the Triton interpreter; tests use it);
* ``"reference"``: eager PyTorch (:mod:`minc_kernels.reference`).

Op modules (``minc_kernels.ops.<name>``) import lazily and only once; the reason an
import failed is kept so that an explicit request can re-raise it.  TorchDynamo cannot
trace an import, so the loss modules call :func:`preload` in their constructors (outside
any compiled region): the first call of ``torch.compile(loss, fullgraph=True)`` then
finds its op already loaded.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "MINC_KERNELS_BACKEND"

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_ops_cache: dict[str, ModuleType | BaseException] = {}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_op(name: str) -> ModuleType:
    """Import ``minc_kernels.ops.<name>`` once; re-raise the original error on failure."""
    cached = _ops_cache.get(name)
    if cached is None:
        try:
            cached = importlib.import_module(f"minc_kernels.ops.{name}")
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised on request
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            cached = exc
        _ops_cache[name] = cached
    if isinstance(cached, BaseException):
        raise cached
    return cached


def preload(op: str, backend: str | None = None) -> None:
    """Import ``minc_kernels.ops.<op>`` now if ``backend`` could select it later.

    Called eagerly (module construction), never inside a compiled region.  Skipped for
    ``backend="reference"`` and on machines where the kernels can never run (no CUDA and
    no ``TRITON_INTERPRET``), so CPU users do not pay Triton's import time.  Failures are
    cached, not raised: ``resolve`` re-raises them when the kernels are requested.
    """
    choice = requested_backend(backend)
    if choice == "reference" or op in _ops_cache:
        return
    if choice == "triton" or triton_interpret() or torch.cuda.is_available():
        try:
            load_op(op)
        except BaseException as exc:  # noqa: BLE001 - kept in the cache for resolve()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise


def op_status(name: str) -> tuple[bool, str]:
    """(available, reason) for ``minc_kernels.ops.<name>``."""
    try:
        load_op(name)
    except BaseException as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


def requested_backend(backend: str | None) -> str:
    value = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if value not in BACKENDS:
        where = "backend" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"{where} must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
    return value


def resolve(backend: str | None, op: str, x: torch.Tensor) -> ModuleType | None:
    """The op module to run for tensor ``x``, or ``None`` for the reference."""
    choice = requested_backend(backend)
    if choice == "reference":
        return None
    on_gpu = x.is_cuda
    if choice == "auto":
        # float64 is an oracle/debug dtype: the kernels serve fp32/bf16/fp16.
        if not on_gpu or x.dtype not in KERNEL_DTYPES:
            return None
        try:
            return load_op(op)
        except BaseException:  # noqa: BLE001 - auto falls back silently; info.py says why
            return None
    # explicit "triton"
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 inputs, got {x.dtype}; "
                        "use backend='reference' for float64")
    if not on_gpu and not triton_interpret():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got a tensor on {x.device}); set "
            "TRITON_INTERPRET=1 to run the kernels on the CPU through Triton's interpreter, "
            "or use backend='auto'/'reference'"
        )
    try:
        return load_op(op)
    except BaseException as exc:
        raise RuntimeError(f"backend='triton' requested but the {op!r} kernels are unavailable: {exc}") from exc
