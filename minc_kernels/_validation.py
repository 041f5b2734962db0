"""Argument checks shared by every public entry point (docs/math.md §6).

Shapes, dtypes and devices only: no check here reads a tensor's values (that would be a
device-to-host sync on the training path).

Every check runs before any kernel launch or state mutation and raises a
``TypeError``/``ValueError`` that names the argument and what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_features(name: str, x, min_batch: int = 1) -> None:
    """``x`` must be a floating (B, k) tensor with B >= ``min_batch`` and k >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, k), got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (B, k) (2 dims), got shape {tuple(x.shape)}")
    if x.shape[0] < min_batch:
        raise ValueError(
            f"{name} must have a batch size B >= {min_batch}, got shape {tuple(x.shape)}"
        )
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have a feature dimension k >= 1, got shape {tuple(x.shape)}")


def check_pair(name_a: str, a, name_b: str, b, min_batch: int = 1, same_dtype: bool = True) -> None:
    """Both (B, k), same shape and device (and dtype unless ``same_dtype=False``)."""
    check_features(name_a, a, min_batch)
    check_features(name_b, b, min_batch)
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a}: expected {tuple(a.shape)}, "
            f"got {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{name_b} must be on the same device as {name_a}: expected {a.device}, got {b.device}"
        )
    if same_dtype and a.dtype != b.dtype:
        raise TypeError(
            f"{name_b} must have the same dtype as {name_a}: expected {a.dtype}, got {b.dtype}"
        )


def check_moment(name: str, moment, k: int, device: torch.device) -> None:
    """A (k, k) floating moment matrix on ``device``."""
    if not isinstance(moment, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({k}, {k}), got {type(moment).__name__}")
    if moment.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {moment.dtype}")
    if tuple(moment.shape) != (k, k):
        raise ValueError(
            f"{name} must have shape ({k}, {k}) to match the feature dimension k={k}, "
            f"got {tuple(moment.shape)}"
        )
    if moment.device != device:
        raise ValueError(f"{name} must be on device {device}, got {moment.device}")


def _real(name: str, value, expected: str) -> float:
    """``value`` as a float if it is a real number (int, float, numpy scalar, 0-d tensor);
    strings and bools are refused rather than coerced (``mu='1'`` is a bug, not 1.0)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_complex \
            and value.dtype != torch.bool:
        value = value.item()  # a hyper-parameter at construction, not the training path
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    return float(value)


def check_positive(name: str, value) -> float:
    v = _real(name, value, "a positive number")
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_nonnegative(name: str, value) -> float:
    v = _real(name, value, "a non-negative number")
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return v


def check_unit_interval(name: str, value) -> float:
    v = _real(name, value, "a number in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
