"""Helpers shared by every Triton launcher: the one device guard, dtype facts, the one
interpreter check, ``cdiv``, and the rough device ceilings of the cost models.

Tile configurations live in :mod:`minc_kernels.ops.configs`; the shared Gram launchers in
:mod:`minc_kernels.ops.gram`.  Importing this module imports triton, so an op module that
uses it fails with ``ImportError`` when triton is missing (``_backend`` then falls back to
the reference).

Meta tensors: the static sm_90 suite (``python -m benchmarks.static_sm90``) runs the real
launchers on ``device="meta"`` tensors with Triton's driver pointed at an sm_90 target, so
every launch is compiled, never run.  Here a meta tensor therefore stands for a CUDA tensor
on the target GPU (an H100: 132 SMs); nothing else sends meta tensors to the launchers
(``torch.compile`` and ``opcheck`` use the ops' ``register_fake`` instead).
"""
from __future__ import annotations

import contextlib

import torch
import triton

from .._backend import KERNEL_DTYPES, triton_interpret

__all__ = [
    "KERNEL_DTYPES",
    "TARGET_SMS",
    "TARGET_PROGRAMS",
    "cdiv",
    "check_kernel_dtype",
    "device_guard",
    "fast_math",
    "interpreting",
    "is_fp32",
    "rhs_f32_mode",
    "upcast_bf16_dot",
    "num_sms",
    "next_pow2",
    "DEVICE_BW",
    "DEVICE_FLOPS",
]

# The device facts every launcher, config and cost model reads (one place).  Tile choices
# depend on these constants, not on the GPU that runs them, so the same shape gives the same
# bits on any GPU.
TARGET_SMS = 132  # H100/H200 SXM; also what a meta tensor's "device" has (module docstring)
TARGET_PROGRAMS = 2 * TARGET_SMS  # about two waves: what the grids aim to fill

def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints.  Plain Python on purpose: ``triton.cdiv`` is a
    ``ConstexprFunction`` in triton 3.8 and costs ~3.5 µs per host call (the spectral
    forward made ~45: benchmarks/results/cpu-host-overhead-2026-12-04)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (as ``triton.next_power_of_2``, 0 for 0); plain
    Python, see :func:`cdiv`."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def check_kernel_dtype(name: str, *tensors: torch.Tensor) -> None:
    """Raise ``TypeError`` unless every tensor is float32/bfloat16/float16, all of one dtype."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in KERNEL_DTYPES:
        got = ", ".join(str(t.dtype) for t in tensors)
        raise TypeError(f"{name}: the Triton kernels take float32, bfloat16 or float16 inputs "
                        f"of one dtype, got {got}")


def device_guard(x: torch.Tensor):
    """Make ``x``'s CUDA device current for the launch (its current stream is then used)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# Triton decides once, when ``@triton.jit`` decorates the kernels (imported with this
# module), whether they are interpreted; read the flag then too, not on every launch (an
# environment lookup per call: ~9 per MINCLoss step, a few µs of host time).
_INTERPRETING = triton_interpret()


def interpreting() -> bool:
    """The kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` when they were
    imported): interpreter tile sizes, the bf16 dot workaround."""
    return _INTERPRETING


def is_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def rhs_f32_mode(dtype: torch.dtype) -> int:
    """MODE of ``minc_kernels.kernels.gram.dot_g_tile`` for a storage dtype times a fp32 matrix:
    0 fp32 (``ieee``), 1 bf16 (three bf16 dots), 2 fp16 (two TF32 dots).  (MODE 3, bf16 on
    pieces split beforehand, is the launcher's choice for large calls, and MODE 4 its
    choice for a ``G`` already in the half dtype: ``ops.gram``.)"""
    if dtype == torch.float32:
        return 0
    if dtype == torch.bfloat16:
        return 1
    if dtype == torch.float16:
        return 2
    raise TypeError(f"the Triton kernels take float32, bfloat16 or float16, got {dtype}")


def upcast_bf16_dot(dtype: torch.dtype) -> bool:
    """The CPU interpreter's ``tl.dot`` cannot multiply bf16 (it sees raw uint16 bits): the
    kernels then run bf16 dots on exact fp32 copies (same products, fp32 accumulation)."""
    return interpreting() and dtype == torch.bfloat16


def fast_math(t: torch.Tensor) -> bool:
    """PTX ``.approx`` MUFU ops may be used: NVIDIA GPUs only (not the interpreter/ROCm)."""
    return (t.is_cuda or t.is_meta) and torch.version.hip is None and not interpreting()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in on the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "meta":
        return TARGET_SMS
    return 2


# Rough H100 ceilings for the cost models (only ratios matter): bytes/s, and flop/s per
# dot kind.  "ieee" fp32 dots run on FMA units; half dots on tensor cores.
DEVICE_BW = 3.0e12
DEVICE_FLOPS = {
    "half": 8.0e14,  # ~800 TFLOP/s bf16/fp16 dense
    "fp32": 5.0e13,  # ~50 TFLOP/s strict fp32 (no TF32)
    "half_x_f32": 2.5e14,  # bf16x3 / tf32x2 split dots
}
