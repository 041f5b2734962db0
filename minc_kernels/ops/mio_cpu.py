"""MIO loss (docs/math.md §3) without a 2B×2B matrix, for devices without the Triton path (the CPU).

``mio_loss_blocked(z1, z2, τp, τn, λ)``: (B, k) views, B >= 2, float16/bfloat16/float32/float64
(possibly non-contiguous); the scalar :func:`minc_kernels.reference.mio_loss` computes, in
float32 (float64 for float64 inputs).

``S = Z Zᵀ`` (``Z = [ẑ1; ẑ2]``, N = 2B rows) is visited in tiles of ``block_rows`` rows ×
``block_cols`` columns, never stored.  S is symmetric and so is the negatives' mask, so a
strip of rows ``[r0, r1)`` only visits the columns ``[r0, N)``: the entries right of its
diagonal block count twice in the sum and feed the gradient of both their row and their
column (``dL/dZ = 2 G Z`` with ``G = dL/dS`` symmetric).  That is 3 matmuls per pair of
mirrored entries instead of 4, and half the softplus/sigmoid work.  In a tile the diagonal
``(i, i)`` and positive ``(i, i±B)`` entries are set to ``-inf`` before the softplus
(``softplus(-inf) = sigmoid(-inf) = 0``); the positives themselves are the row dots
``ẑ1_i·ẑ2_i`` (O(Bk)).

The gradient ``dL/dz`` is computed in the forward pass (only when an input needs it: the
loss is a scalar, so backward only scales it) and then taken through the normalisation's
Jacobian ``(g - ẑ (ẑ·g)) / ||z||`` (``g / eps`` for rows with ``||z|| < eps``, as
``F.normalize``'s autograd gives).  No double backward.

Tile shape: as few, as large tiles as the memory budget allows.  Each tile costs a handful of
multi-threaded ops, each ending in an OpenMP barrier; on a busy machine a barrier waits for a
descheduled thread.  At B = 8192 on the shared 2-core machine (2 threads, load ~8), square
tiles of 512² and 1024² took 26 s and 14 s, strips of whole rows 7-8 s
(benchmarks/results/cpu-memory-2026-12-01).  Extra memory: O(N·k) (ẑ, the gradient) plus one
tile and its softplus/sigmoid buffer, ``2 · block_rows · block_cols · itemsize`` (see
:func:`tile_bytes`): at most ``2 · TILE_BUDGET_BYTES`` whatever B.

Precision: float16/bfloat16 inputs are computed in float32 (the CPU has no faster half
matmul to trade for accuracy); float32 in float32 with per-tile sums accumulated in float64;
float64 in float64 (gradcheck).  Same input, same bits: the tile order is fixed.

Registered as ``minc_kernels::mio_loss_blocked_fwd`` (``torch.library.custom_op`` with
register_fake and register_autograd), so it also runs under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._grad_in_forward import register_grad_in_forward

__all__ = ["mio_loss_blocked", "mio_blocked_forward", "default_blocks", "tile_bytes",
           "TILE_BUDGET_BYTES", "MEMORY_BUDGET_BYTES"]

EPS = 1e-12  # F.normalize's eps, as in the reference
# Issue 15's bound on the extra memory at any B (the tile buffers plus the O(N·k) tensors).
MEMORY_BUDGET_BYTES = 1 << 30
# Bytes of one tile buffer (two live at once): a quarter of the budget leaves room for the
# O(N·k) tensors (64 MiB in fp32 at B = 32768, k = 128) and for a packed copy MKL may make.
TILE_BUDGET_BYTES = 1 << 27
# Fewer rows than this and the tile matmuls (k deep) stop running at full MKL speed.
_MIN_ROWS = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _itemsize(dtype: torch.dtype) -> int:
    return 8 if _compute_dtype(dtype) == torch.float64 else 4


def default_blocks(b: int, k: int, dtype: torch.dtype = torch.float32,
                   block_rows: int | None = None) -> tuple[int, int]:
    """(block_rows, block_cols) for ``b`` pairs: the largest tiles within ``TILE_BUDGET_BYTES``.

    Whole rows of S (``block_cols = N``) in at least 8 strips while ``block_rows >= 256``
    of them fit, then 256-row tiles of as many columns as fit.  ``block_rows`` given: only
    the columns are chosen.
    """
    n = 2 * b
    elems = max(1, TILE_BUDGET_BYTES // _itemsize(dtype))
    if block_rows is None:
        # at least 8 strips: the diagonal blocks are computed whole (both triangles), which
        # wastes half a strip's square each; with 8 strips the work is 9/16 of N², not 3/4
        block_rows = max(min(n, _MIN_ROWS), min(n, elems // n, -(-n // 8)))
    block_cols = max(1, min(n, elems // block_rows))
    return block_rows, block_cols


def tile_bytes(block_rows: int, block_cols: int, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of the per-tile buffers: the tile of S and its softplus/sigmoid buffer."""
    return 2 * block_rows * block_cols * _itemsize(dtype)


def _mask_tile(x: torch.Tensor, r0: int, c0: int, b: int) -> None:
    """Set the entries (i, i) and (i, i±B) of the tile ``S[r0:r0+h, c0:c0+w]`` to -inf.

    Each set is a run of one diagonal of the tile: global row r maps to column r (offset
    ``r0 - c0``), rows r < B to r + B, rows r >= B to r - B.  Plain index arithmetic.
    """
    h, w = x.shape
    r1, c1 = r0 + h, c0 + w
    n = 2 * b
    for shift, lo, hi in ((0, 0, n), (b, 0, b), (-b, b, n)):
        # rows r in [lo, hi) ∩ [r0, r1) whose column r + shift lies in [c0, c1)
        a = max(r0, lo, c0 - shift)
        e = min(r1, hi, c1 - shift)
        if a < e:
            # tile row i = r - r0 sits at column i + d; diagonal d starts at row max(0, -d)
            d = (r0 + shift) - c0
            start = (a - r0) - max(0, -d)
            x.diagonal(offset=d)[start:start + (e - a)].fill_(float("-inf"))


def mio_blocked_forward(z1: torch.Tensor, z2: torch.Tensor, pos_temperature: float,
                        neg_temperature: float, lambda_l2: float, need_grad: bool,
                        block_rows: int | None = None, block_cols: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (scalar) and, if ``need_grad``, ``dL/d[z1; z2]`` ((2B, k); else an empty tensor).

    Both in float32 (float64 for float64 inputs).  Autocast is switched off inside: the
    tiles are computed in the stated dtypes (a bf16-autocast region around the loss would
    otherwise turn the fp32 tile matmuls into bf16 ones, against fp32 accumulators).
    """
    with torch.autocast(device_type=z1.device.type, enabled=False):
        return _mio_blocked_forward(z1, z2, pos_temperature, neg_temperature, lambda_l2,
                                    need_grad, block_rows, block_cols)


def _mio_blocked_forward(z1, z2, pos_temperature, neg_temperature, lambda_l2, need_grad,
                         block_rows, block_cols):
    if z1.dtype not in _FLOAT_DTYPES or z2.dtype != z1.dtype:
        raise TypeError(f"z1, z2 must be floating tensors of one dtype, got {z1.dtype} and "
                        f"{z2.dtype}")
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] < 2 or z1.shape[1] < 1:
        raise ValueError(f"z1, z2 must both have shape (B, k) with B >= 2, k >= 1, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    b, k = z1.shape
    n = 2 * b
    block_rows, default_cols = default_blocks(b, k, z1.dtype,
                                              int(block_rows) if block_rows else None)
    block_cols = int(block_cols) if block_cols else default_cols
    cdt = _compute_dtype(z1.dtype)
    acc_dt = torch.float64  # tile sums are added across up to ~10^4 tiles: keep them exact-ish

    z = torch.cat([z1, z2], dim=0).to(cdt)                      # (N, k), contiguous copy
    # float64 accumulation: rows near 1e20 would overflow a float32 sum of squares
    norm = torch.linalg.vector_norm(z, dim=1, keepdim=True, dtype=torch.float64).to(cdt)
    denom = norm.clamp_min(EPS)
    zh = z / denom                                               # ẑ, as F.normalize
    zh1, zh2 = zh[:b], zh[b:]

    # Positives (each pair appears twice in S, mean over N = 2B entries) and the L2 term.
    s_pos = (zh1 * zh2).sum(dim=1)                               # (B,)
    loss_pos = F.softplus(s_pos / (-pos_temperature)).sum() / b
    diff = zh1 - zh2
    loss_reg = diff.pow(2).sum() * (lambda_l2 / (b * k))

    # Negatives: strips of S/τn, rows [r0, r1) × columns [r0, N) in chunks of block_cols.
    # Columns [r0, r1) (the diagonal block, the first d columns of the first chunk) hold
    # both S_ij and S_ji: counted once, no transposed gradient; every later column counted
    # twice, and its transpose feeds the gradient of the column's row.
    zs = zh * (1.0 / neg_temperature)                            # x = (ẑ_R/τn) ẑ_Cᵀ = S_RC/τn
    gz = torch.zeros_like(zh) if need_grad else None             # Σ_j σ(S_ij/τn) ẑ_j
    neg_sum = torch.zeros((), dtype=acc_dt, device=z.device)
    for r0 in range(0, n, block_rows):
        r1 = min(r0 + block_rows, n)
        zs_r, zh_r = zs[r0:r1], zh[r0:r1]
        for c0 in range(r0, n, block_cols):
            c1 = min(c0 + block_cols, n)
            d = max(0, min(r1, c1) - c0)                         # diagonal-block columns
            zh_c = zh[c0:c1]
            x = torch.mm(zs_r, zh_c.T)
            _mask_tile(x, r0, c0, b)
            buf = F.softplus(x)
            # torch's float32 sum is a cascade (accurate over a tile); summing in float64
            # would first copy the tile to float64, a pass as costly as the softplus.
            tile_sum = 2.0 * buf.sum().to(acc_dt)
            if d:
                tile_sum -= buf[:, :d].sum().to(acc_dt)
            neg_sum += tile_sum
            if need_grad:
                sig = torch.sigmoid(x, out=buf)
                gz[r0:r1].addmm_(sig, zh_c)
                if c1 > c0 + d:
                    gz[c0 + d:c1].addmm_(sig[:, d:].T, zh_r)
    n_neg = float(n) * float(n - 2)
    loss = (loss_pos.to(acc_dt) + loss_reg.to(acc_dt) + neg_sum / n_neg).to(cdt)
    if not need_grad:
        return loss, torch.empty((0,), dtype=cdt, device=z.device)

    # dL/dẑ: negatives 2 G Z; positives; the L2 term.
    g = gz.mul_(2.0 / (neg_temperature * n_neg))
    coef = torch.sigmoid(s_pos / (-pos_temperature)) * (-1.0 / (pos_temperature * b))
    coef = coef.unsqueeze(1)
    g[:b].addcmul_(coef, zh2)
    g[b:].addcmul_(coef, zh1)
    reg_coef = 2.0 * lambda_l2 / (b * k)
    g[:b].add_(diff, alpha=reg_coef)
    g[b:].sub_(diff, alpha=reg_coef)
    # Through ẑ = z / max(||z||, eps): (g - ẑ(ẑ·g)) / ||z|| above eps, g / eps below.
    radial = (zh * g).sum(dim=1, keepdim=True)
    dz = torch.where(norm > EPS, (g - zh * radial) / denom, g / denom)
    return loss, dz


# --------------------------------------------------------------------------- torch.library
@torch.library.custom_op("minc_kernels::mio_loss_blocked_fwd", mutates_args=())
def _mio_loss_blocked_fwd(z1: torch.Tensor, z2: torch.Tensor, pos_temperature: float,
                          neg_temperature: float, lambda_l2: float, need_grad: bool,
                          block_rows: int, block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/d[z1; z2] as (2B, k), or an empty tensor when ``need_grad`` is False).

    ``block_rows``/``block_cols`` 0: :func:`default_blocks`.
    """
    return mio_blocked_forward(z1, z2, pos_temperature, neg_temperature, lambda_l2, need_grad,
                               block_rows, block_cols)


@_mio_loss_blocked_fwd.register_fake
def _(z1, z2, pos_temperature, neg_temperature, lambda_l2, need_grad, block_rows, block_cols):
    cdt = _compute_dtype(z1.dtype)
    loss = z1.new_empty((), dtype=cdt)
    if need_grad:
        dz = z1.new_empty((2 * z1.shape[0], z1.shape[1]), dtype=cdt)
    else:
        dz = z1.new_empty((0,), dtype=cdt)
    return loss, dz


_mio_loss_blocked = register_grad_in_forward(_mio_loss_blocked_fwd, need_grad_index=5,
                                             layout="stacked", what="the blocked MIO loss",
                                             body=mio_blocked_forward)


def _check_block(name: str, value) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def mio_loss_blocked(z1: torch.Tensor, z2: torch.Tensor, pos_temperature: float = 0.5,
                     neg_temperature: float = 0.5, lambda_l2: float = 1.0,
                     block_rows: int | None = None, block_cols: int | None = None
                     ) -> torch.Tensor:
    """MIO loss of (B, k) views (docs/math.md §3), S in ``block_rows × block_cols`` tiles; differentiable.

    ``None``: :func:`default_blocks`.  Returns a float32 scalar (float64 for float64
    inputs), equal to :func:`minc_kernels.reference.mio_loss` up to rounding.
    """
    rows = _check_block("block_rows", block_rows)
    cols = _check_block("block_cols", block_cols)
    need_grad = torch.is_grad_enabled() and (z1.requires_grad or z2.requires_grad)
    loss, _ = _mio_loss_blocked(
        z1, z2, float(pos_temperature), float(neg_temperature), float(lambda_l2),
        bool(need_grad), rows, cols)
    return loss
