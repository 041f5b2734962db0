"""Which implementation runs a loss: the Triton kernels or the eager reference.

``backend`` (argument) or ``MINC_KERNELS_BACKEND`` (env var) is one of:

* ``"auto"`` (default): the Triton kernels for CUDA fp32/bf16/fp16 tensors when Triton and
  the op are available, the reference otherwise (always on the CPU, even under
  ``TRITON_INTERPRET=1``);
* ``"triton"``: the kernels, or a clear error saying why they cannot run.  On the
  CPU this needs ``TRITON_INTERPRET=1`` (the Triton interpreter; tests use it);
* ``"reference"``: eager PyTorch (:mod:`minc_kernels.reference`).

Two steps, each done once:

1. :func:`requested_backend` validates the argument (or reads the env var).  The loss
   modules call it in their constructors; the functional forms at their boundary.
2. :func:`select` makes the choice that depends on the tensors (device, dtype), once per
   call, and returns the op module or ``None`` for the reference.

The one lazy seam: :func:`load_op` imports ``minc_kernels.ops.<name>`` on first use, because
importing an op imports Triton (seconds on the CPU, where ``auto`` never runs a kernel).
The op names come from the registry (``minc_kernels.losses.REGISTRY``).  The reason an import failed is kept, so
an explicit ``backend="triton"`` re-raises it.  TorchDynamo cannot trace an import, so the
loss modules call :func:`preload` in their constructors (outside any compiled region).
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


def _import_op(name: str) -> ModuleType:
    # ``name`` is a registry entry's ``op`` (minc_kernels.losses.REGISTRY); importing the
    # op module imports triton.
    if not name.isidentifier():
        raise ValueError(f"op must name a module of minc_kernels.ops, got {name!r}")
    return importlib.import_module(f"{__package__}.ops.{name}")


def load_op(name: str) -> ModuleType:
    """Import ``minc_kernels.ops.<name>`` once; re-raise the original error on failure."""
    cached = _ops_cache.get(name)
    if cached is None:
        try:
            cached = _import_op(name)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised on request
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            cached = exc
        _ops_cache[name] = cached
    if isinstance(cached, BaseException):
        raise cached
    return cached


def preload(op: str, choice: str) -> None:
    """Import ``minc_kernels.ops.<op>`` now if the validated ``choice`` could select it later.

    Called eagerly (module construction), never inside a compiled region.  Skipped for
    ``"reference"`` and on machines where the kernels can never run (no CUDA and no
    ``TRITON_INTERPRET``), so CPU users do not pay Triton's import time.  Failures are
    cached, not raised: :func:`select` re-raises them when the kernels are requested.
    """
    if choice == "reference" or op in _ops_cache:
        return
    if choice == "triton" or triton_interpret() or torch.cuda.is_available():
        try:
            load_op(op)
        except BaseException as exc:  # noqa: BLE001 - kept in the cache for select()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise


def op_status(name: str) -> tuple[bool, str]:
    """(importable, reason) for ``minc_kernels.ops.<name>``."""
    try:
        load_op(name)
    except BaseException as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


def requested_backend(backend: str | None) -> str:
    """The validated backend name: ``backend``, or the env var when ``backend`` is None."""
    value = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if value not in BACKENDS:
        where = "backend" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"{where} must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
    return value


def functorch_active() -> bool:
    """Inside a ``torch.func`` transform (grad, vmap, jacrev, ...), where the custom ops'
    autograd (``torch.library``) cannot run: ``"auto"`` then takes the eager reference."""
    return torch._C._are_functorch_transforms_active()


def auto_runs_kernels(x: torch.Tensor) -> bool:
    """Whether ``"auto"`` would pick the kernels for ``x`` (if the op imports)."""
    # float64 is an oracle/debug dtype: the kernels serve fp32/bf16/fp16.
    return x.is_cuda and x.dtype in KERNEL_DTYPES


def select(choice: str, op: str, x: torch.Tensor) -> ModuleType | None:
    """The op module to run for tensor ``x`` under a validated ``choice``, or ``None``
    for the reference."""
    if choice == "reference":
        return None
    if choice == "auto":
        if not auto_runs_kernels(x) or functorch_active():
            return None
        try:
            return load_op(op)
        except BaseException:  # noqa: BLE001 - auto falls back silently; info.py says why
            return None
    # explicit "triton"
    if functorch_active():
        raise RuntimeError("backend='triton' cannot run under torch.func transforms (grad, vmap, "
                           "jacrev, ...): the kernels' custom ops have no functorch rule; use "
                           "backend='auto' (the reference runs there) or 'reference'")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 inputs, got {x.dtype}; "
                        "use backend='reference' for float64")
    if not x.is_cuda and not triton_interpret():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got a tensor on {x.device}); set "
            "TRITON_INTERPRET=1 to run the kernels on the CPU through Triton's interpreter, "
            "or use backend='auto'/'reference'"
        )
    try:
        return load_op(op)
    except BaseException as exc:
        raise RuntimeError(f"backend='triton' requested but the {op!r} kernels are unavailable: {exc}") from exc


def resolve(backend: str | None, op: str, x: torch.Tensor) -> ModuleType | None:
    """:func:`requested_backend` then :func:`select`: for one-off calls (the functional forms)."""
    return select(requested_backend(backend), op, x)


def size_hint(n) -> int | None:
    """``n`` as a Python int without adding a guard: a traced symbolic size (torch.compile
    or torch.export with a dynamic batch) gives its example value, or None when it has
    none.  For choices that change speed, never the value (e.g. which exact evaluation
    of the spectral term runs), so a graph traced at one size stays right at any other."""
    if isinstance(n, torch.SymInt):
        return n.node.hint
    return int(n)
