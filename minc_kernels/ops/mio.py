"""MIO loss (docs/math.md §3) on the Triton kernels of :mod:`minc_kernels.kernels.mio`.

``mio_loss(z1, z2, τp, τn, λ)``: (B, k) views, B >= 2, float32/bfloat16/float16 (possibly
non-contiguous); float32 scalar equal to :func:`minc_kernels.reference.mio_loss`.

Flash-style: ``S = Z Zᵀ`` (``Z = [ẑ1; ẑ2]``, N = 2B rows) is streamed tile by tile and never
stored.  Extra memory, all O(B·k): ``ẑ`` (N×k, input dtype), the gradient (N×k fp32) and
either (k <= 256) ``n_splits <= 16`` fp32 N×k partials, when the rows are split over column
ranges to fill the GPU at small B, or (k > 256) a strip of ``σ(S/τn)`` of at most
``max(2048, 2k)`` rows × N in the input dtype.  The gradient ``dL/dz`` is computed in the
forward pass (only when an input needs it), backward only scales it by the upstream grad
(so there is no double backward: ``create_graph=True`` raises).

Precision: ``tl.dot`` accumulates in fp32.  float32 inputs use ``input_precision="ieee"``
(strict fp32, no TF32: the loss is compared against an fp32 reference, and TF32's 10-bit
mantissa would cost ~1e-3 relative error in S at no memory-traffic saving that matters here).
bfloat16/float16 inputs: the operands ``ẑ`` and ``σ(S/τn)`` are rounded to the input dtype
(as eager autograd rounds ``dL/dS`` before its matmul), fp32 accumulation; the precision
flag does not apply to them.  Row norms, softplus/sigmoid, all sums: fp32.

Reductions are deterministic: per-program fp32 partials, summed in a fixed order (the
launch configuration depends only on the shape and dtype, not on the device).

Registered as the custom op ``minc_kernels::mio_loss_fwd`` (``torch.library.custom_op``,
opaque to torch.compile, with register_fake and register_autograd), so it works under
``torch.compile(fullgraph=True)``, on CUDA and on CPU tensors with ``TRITON_INTERPRET=1``.
Importing this module raises ImportError when triton is missing.
"""
from __future__ import annotations

import functools

import torch

from ..kernels.mio import (
    mio_grad_finalize,
    mio_loss_combine,
    mio_negative_strip,
    mio_negative_tiles,
    mio_normalize_rows,
    mio_strip_matmul,
)
from ._common import cdiv, check_kernel_dtype, device_guard, fast_math, interpreting, upcast_bf16_dot
from ._grad_in_forward import register_grad_in_forward
from .configs import KernelConfig, pick_config

__all__ = ["mio_loss", "mio_forward", "pick_config"]

EPS = 1e-12  # F.normalize's eps, as in the reference


@functools.lru_cache(maxsize=256)
def _default_config(b: int, k: int, dtype: torch.dtype, on_gpu: bool) -> KernelConfig:
    return pick_config(b, k, dtype, on_gpu=on_gpu)


def _negatives_in_one_pass(zhat, b, n, ks, neg_temperature, need_grad, cfg, is_f32,
                           interp_bf16):
    """Registers / streamed path: ``(gpart (n_splits, N, KS), neg_part)`` in one launch."""
    dev, f32 = zhat.device, torch.float32
    n_splits = cfg["n_splits"]
    n_row_blocks = cdiv(n, cfg["BLOCK_M"])
    n_col_blocks = cdiv(n, cfg["BLOCK_N"])
    bps = cdiv(n_col_blocks, n_splits)
    if need_grad:
        alloc = torch.empty if cfg["ACC_IN_REGS"] else torch.zeros
        gpart = alloc((n_splits, n, ks), dtype=f32, device=dev)
    else:
        gpart = torch.empty((1,), dtype=f32, device=dev)
    neg_part = torch.empty((n_splits, n_row_blocks), dtype=f32, device=dev)
    mio_negative_tiles[(n_row_blocks, n_splits)](
        zhat, gpart, neg_part, b, n, ks,
        1.0 / neg_temperature, n_col_blocks, bps,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        ACC_IN_REGS=cfg["ACC_IN_REGS"], COMPUTE_GRAD=need_grad, IS_FP32=is_f32,
        INTERP_BF16=interp_bf16, FAST_MATH=fast_math(zhat),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return gpart, neg_part


def _negatives_by_strips(zhat, b, n, ks, neg_temperature, need_grad, cfg, is_f32,
                         interp_bf16):
    """Large-k path: per group of ``strip_rows`` rows, S tiles -> σ strip -> strip @ Ẑ.

    S is computed once and the gradient is a GEMM (both compute-bound at large k), instead
    of a read-modify-write of an fp32 accumulator per column block.  The strip
    (``strip_rows`` × N, input dtype, ``strip_rows <= max(2048, 2k)``) is the only extra
    buffer: O(B·k).
    ``strip_rows`` is a multiple of ``BLOCK_M`` (:func:`~minc_kernels.ops.configs.pick_config`).
    """
    dev, f32 = zhat.device, torch.float32
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    strip_rows, nw, ns = cfg["strip_rows"], cfg["num_warps"], cfg["num_stages"]
    n_col_blocks = cdiv(n, bn)
    np_ = n_col_blocks * bn
    neg_part = torch.empty((cdiv(n, bm), n_col_blocks), dtype=f32, device=dev)
    if need_grad:
        strip = torch.empty((strip_rows, np_), dtype=zhat.dtype, device=dev)
        gpart = torch.empty((1, n, ks), dtype=f32, device=dev)
    else:
        strip = gpart = torch.empty((1,), dtype=f32, device=dev)
    # Strips of whole row blocks, as even as the blocks allow (at most strip_rows rows each):
    # full strips and a thin remainder left the last launches a few programs (N = 2062 in
    # fp32: 2048 + 14 rows, 33 and 16 programs on 132 SMs).
    n_row_blocks = cdiv(n, bm)
    n_strips = cdiv(n_row_blocks, strip_rows // bm)
    for s in range(n_strips):
        row0 = s * n_row_blocks // n_strips * bm
        rows_here = min(n, (s + 1) * n_row_blocks // n_strips * bm) - row0
        mio_negative_strip[(cdiv(rows_here, bm), n_col_blocks)](
            zhat, strip, neg_part, b, n, ks, np_, row0, 1.0 / neg_temperature,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, COMPUTE_GRAD=need_grad, IS_FP32=is_f32,
            INTERP_BF16=interp_bf16, FAST_MATH=fast_math(zhat), num_warps=nw, num_stages=ns,
        )
        if need_grad:
            mio_strip_matmul[(cdiv(rows_here, bm), cdiv(ks, bn))](
                strip, zhat, gpart, n, ks, np_, row0, rows_here,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IS_FP32=is_f32,
                INTERP_BF16=interp_bf16, num_warps=nw, num_stages=ns,
            )
    return gpart, neg_part


def mio_forward(z1: torch.Tensor, z2: torch.Tensor, pos_temperature: float, neg_temperature: float,
                lambda_l2: float, need_grad: bool, config: KernelConfig | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) and, if ``need_grad``, ``dL/d[z1; z2]`` ((2B, k) fp32; else empty).
    ``config``: a :func:`~minc_kernels.ops.configs.pick_config` result (default: the one for
    this shape and dtype)."""
    check_kernel_dtype("mio_loss", z1, z2)
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] < 2:
        raise ValueError(f"z1, z2 must both have shape (B, k) with B >= 2, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    b, k = z1.shape
    n = 2 * b
    dev = z1.device
    cfg = config if config is not None else _default_config(b, k, z1.dtype, not interpreting())
    f32 = torch.float32
    # Workarounds for the CPU interpreter's bf16 (dot on raw bits, truncating casts).
    interp_bf16 = upcast_bf16_dot(z1.dtype)
    with device_guard(z1):
        # Row stride of ẑ and of the gradient partials: k padded to the tile's k (zeros).
        ks = cdiv(k, cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        zhat = torch.empty((n, ks), dtype=z1.dtype, device=dev)
        norms = torch.empty((n,), dtype=f32, device=dev)
        pos_coef = torch.empty((b,), dtype=f32, device=dev)
        rows_br, rows_bk = cfg["ROWS_BLOCK_R"], cfg["ROWS_BLOCK_K"]
        n_row_prog = cdiv(b, rows_br)
        pos_part = torch.empty((n_row_prog,), dtype=f32, device=dev)
        reg_part = torch.empty((n_row_prog,), dtype=f32, device=dev)
        mio_normalize_rows[(n_row_prog,)](
            z1, z2, zhat, norms, pos_coef, pos_part, reg_part,
            b, k, ks, z1.stride(0), z1.stride(1), z2.stride(0), z2.stride(1),
            1.0 / pos_temperature,
            EPS=EPS, BLOCK_R=rows_br, BLOCK_K=rows_bk, INTERP_BF16=interp_bf16,
        )
        # fp32: strict IEEE (dot_same); 16-bit operands: the native half dot
        is_f32 = z1.dtype == torch.float32
        if cfg["strip_rows"]:
            gpart, neg_part = _negatives_by_strips(zhat, b, n, ks, neg_temperature, need_grad,
                                                   cfg, is_f32, interp_bf16)
        else:
            gpart, neg_part = _negatives_in_one_pass(zhat, b, n, ks, neg_temperature, need_grad,
                                                     cfg, is_f32, interp_bf16)
        n_neg = float(n) * float(n - 2)
        loss = torch.empty((), dtype=f32, device=dev)
        mio_loss_combine[(1,)](
            pos_part, n_row_prog, neg_part, neg_part.numel(), reg_part, loss,
            1.0 / b, 1.0 / n_neg, lambda_l2 / (b * k), BLOCK=256,
        )
        if not need_grad:
            return loss, torch.empty((0,), dtype=f32, device=dev)
        dz = torch.empty((n, k), dtype=f32, device=dev)
        mio_grad_finalize[(n_row_prog,)](
            z1, z2, norms, pos_coef, gpart, dz, b, n, k, ks, cfg["n_splits"],
            z1.stride(0), z1.stride(1), z2.stride(0), z2.stride(1),
            2.0 / (neg_temperature * n_neg), 1.0 / b, 2.0 * lambda_l2 / (b * k),
            EPS=EPS, BLOCK_R=rows_br, BLOCK_K=rows_bk, num_warps=cfg["FINALIZE_NUM_WARPS"],
        )
    return loss, dz


# --------------------------------------------------------------------------- torch.library
@torch.library.custom_op("minc_kernels::mio_loss_fwd", mutates_args=())
def _mio_loss_fwd(z1: torch.Tensor, z2: torch.Tensor, pos_temperature: float,
                  neg_temperature: float, lambda_l2: float, need_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/d[z1; z2] as (2B, k) fp32, or an empty tensor when ``need_grad`` is False)."""
    return mio_forward(z1, z2, pos_temperature, neg_temperature, lambda_l2, need_grad)


@_mio_loss_fwd.register_fake
def _(z1, z2, pos_temperature, neg_temperature, lambda_l2, need_grad):
    loss = z1.new_empty((), dtype=torch.float32)
    if need_grad:
        dz = z1.new_empty((2 * z1.shape[0], z1.shape[1]), dtype=torch.float32)
    else:
        dz = z1.new_empty((0,), dtype=torch.float32)
    return loss, dz


_mio_loss = register_grad_in_forward(_mio_loss_fwd, need_grad_index=5, layout="stacked",
                                     what="mio_loss (backend='triton')", body=mio_forward)


def mio_loss(z1: torch.Tensor, z2: torch.Tensor, pos_temperature: float, neg_temperature: float,
             lambda_l2: float) -> torch.Tensor:
    """MIO loss of (B, k) views on the Triton kernels (docs/math.md §3); float32 scalar, differentiable."""
    need_grad = torch.is_grad_enabled() and (z1.requires_grad or z2.requires_grad)
    loss, _ = _mio_loss(
        z1, z2, float(pos_temperature), float(neg_temperature), float(lambda_l2), bool(need_grad))
    return loss
