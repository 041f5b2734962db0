"""Helpers shared by the Triton launchers (device guard, dtype facts, rough device ceilings).

Importing this module imports triton, so an op module that uses it fails with
``ImportError`` when triton is missing (``_backend`` then falls back to the reference).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton  # noqa: F401  - the ImportError that disables the kernels when triton is missing

__all__ = [
    "device_guard",
    "interpreting",
    "is_fp32",
    "rhs_f32_mode",
    "upcast_bf16_dot",
    "num_sms",
    "next_pow2",
    "DEVICE_BW",
    "DEVICE_FLOPS",
]


def device_guard(x: torch.Tensor):
    """Make ``x``'s CUDA device current for the launch (its current stream is then used)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def interpreting() -> bool:
    """Kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def rhs_f32_mode(dtype: torch.dtype) -> int:
    """MODE of ``minc_kernels.kernels.minc._dot_rhs_f32`` for a storage dtype times a fp32 matrix:
    0 fp32 (``ieee``), 1 bf16 (three bf16 dots), 2 fp16 (two TF32 dots)."""
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


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in on the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Rough H100 ceilings for the cost models (only ratios matter): bytes/s, and flop/s per
# dot kind.  "ieee" fp32 dots run on FMA units; half dots on tensor cores.
DEVICE_BW = 3.0e12
DEVICE_FLOPS = {
    "half": 8.0e14,  # ~800 TFLOP/s bf16/fp16 dense
    "fp32": 5.0e13,  # ~50 TFLOP/s strict fp32 (no TF32)
    "half_x_f32": 2.5e14,  # bf16x3 / tf32x2 split dots
}
