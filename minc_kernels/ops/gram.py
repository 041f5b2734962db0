"""The shared Gram layer (launcher side): ``Xᵀ X``, ``<G, Xᵀ X>_F`` and the fused ``X Gᵀ``.

MINC is :func:`rowmat` + :func:`gram`; the spectral feature-Gram path uses all three.
A new loss whose gradient is ``α·X Gᵀ + (β + γ·d)∘Y`` for a fp32 k×k ``G`` calls these and
adds no kernel (see docs/kernels.md).  Tile sizes: :mod:`minc_kernels.ops.configs`.
Deterministic: per-program fp32 partials summed by ``torch.sum`` in a fixed order.
"""
from __future__ import annotations

import torch

from ..kernels.gram import moment_partial_kernel, rowmat_kernel
from . import configs
from ._common import cdiv, device_guard, is_fp32, num_sms, rhs_f32_mode, upcast_bf16_dot

__all__ = ["rowmat", "gram", "gram_dot"]


def rowmat(x: torch.Tensor, g: torch.Tensor, y: torch.Tensor, d: torch.Tensor | None,
           alpha: float, beta: float, gamma: float, gha: bool, need_grad: bool):
    """``Q = X Gᵀ`` fused: returns ``(Σ x∘q, Σ x∘y, out)`` with ``out = α·Q' + (β + γ·d)·y``
    (fp32 (B, k), ``Q'`` = ``X LT(G)ᵀ`` with ``gha``) or ``None`` without ``need_grad``."""
    b, k = x.shape
    cfg = configs.rowmat_config(k, x.dtype, gha=bool(gha and need_grad), b=b)
    grid = (cdiv(b, cfg["BLOCK_M"]), cdiv(k, cfg["BLOCK_N"]))
    part = torch.empty(grid[0] * grid[1], 2, dtype=torch.float32, device=x.device)
    out = torch.empty((b, k) if need_grad else (1, 1), dtype=torch.float32, device=x.device)
    d_arg = d if d is not None else part
    with device_guard(x):
        rowmat_kernel[grid](
            x, g, y, d_arg, out, part, b, k,
            x.stride(0), x.stride(1), g.stride(0), g.stride(1), y.stride(0), y.stride(1),
            out.stride(0), out.stride(1),
            float(alpha), float(beta), float(gamma),
            NEED_GRAD=bool(need_grad), GHA=bool(gha), HAS_D=d is not None,
            MODE=rhs_f32_mode(x.dtype), UPCAST=upcast_bf16_dot(x.dtype), **cfg,
        )
    sums = part.sum(dim=0)
    return sums[0], sums[1], (out if need_grad else None)


def _gram_launch(x: torch.Tensor, other: torch.Tensor | None):
    b, k = x.shape
    cfg = configs.gram_config(k, x.dtype)
    nk = cdiv(k, cfg["BLOCK_K"])
    nb = cdiv(b, cfg["BLOCK_B"])
    tiles = nk * (nk + 1) // 2
    # Enough programs to fill the device; the slices' partials are summed afterwards.
    split = max(1, min(nb, cdiv(2 * num_sms(x.device), tiles)))
    rows_per_split = cdiv(nb, split) * cfg["BLOCK_B"]
    split = cdiv(b, rows_per_split)
    if other is None:
        out = torch.empty(split, k, k, dtype=torch.float32, device=x.device)
    else:
        out = torch.zeros(split * nk * nk, dtype=torch.float32, device=x.device)
    with device_guard(x):
        moment_partial_kernel[(nk, nk, split)](
            x, out, other if other is not None else out, b, k, x.stride(0), x.stride(1),
            rows_per_split, IS_FP32=is_fp32(x.dtype), UPCAST=upcast_bf16_dot(x.dtype),
            DOT_WITH_OTHER=other is not None, **cfg,
        )
    return out, split


def gram(x: torch.Tensor) -> torch.Tensor:
    """``Xᵀ X`` = ``Σ_j x_j x_jᵀ`` as fp32 (k, k), from the storage dtype of ``x``."""
    out, split = _gram_launch(x, None)
    return out[0] if split == 1 else out.sum(dim=0)


def gram_dot(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``<other, Xᵀ X>_F`` (fp32 scalar) for a symmetric contiguous fp32 (k, k) ``other``,
    without writing ``Xᵀ X``."""
    out, _ = _gram_launch(x, other.contiguous())
    return out.sum()
