"""Triton kernels of the spectral contrastive loss (docs/math.md §1).

* :func:`clip_rows_dot_kernel`: per-row norm clipping to ``sqrt(mu)`` (clipped rows written
  in the storage dtype, as the reference rounds them) and ``d_i = z1c_i·z2c_i`` (fp32).
* :func:`pairwise_offdiag_kernel`: the pairwise-tile path.  Streams tiles of
  ``S = X Yᵀ``, zeroes the diagonal, and reduces ``Σ_{i≠j} S_ij²`` per row block; with
  ``NEED_GRAD`` it also forms ``α·offdiag(S) Y + β·Y`` for one chunk of output columns,
  recomputing the S tiles (never storing a B×B matrix).  With the gradient one launch
  gives both ``dZ1`` (programs on ``(Z1, Z2)``) and ``dZ2`` (programs on ``(Z2, Z1)``:
  ``offdiag(S)ᵀ Z1``).
* :func:`clip_rows_backward_kernel`: a gradient's split partials summed and the clipping
  Jacobian applied, in place on the fp32 gradient.
* The matrix path's pass over ``S`` (B×B, from the row slices of ``cross_gram``):
  ``kernels.gram.gram_finish_kernel``.
* The loss itself: ``kernels.gram.combine_kernel`` on ``d`` and the path's partials.
* The feature-Gram path uses :mod:`minc_kernels.kernels.gram` (``Zᵀ Z`` and ``Z G``).

Precision: ``S`` tiles use ``input_precision="ieee"`` (strict fp32) for fp32 inputs and the
native half tensor-core dot for bf16/fp16, both with fp32 accumulation; the second dot
rounds ``offdiag(S)`` to the storage dtype first (as eager autograd does).  int64 offsets.
"""
import triton
import triton.language as tl

from .gram import dot_same


@triton.jit
def clip_rows_dot_kernel(
    z1_ptr, z2_ptr, z1c_ptr, z2c_ptr, d_ptr, n1_ptr, n2_ptr,
    B, K, stride_1b, stride_1k, stride_2b, stride_2k, r,
    CLIP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows ``[pid·BR, (pid+1)·BR)``: norms ``n1, n2``, clipped rows (contiguous, storage
    dtype) when ``CLIP``, and ``d_i = z1c_i·z2c_i`` from the rounded clipped values."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < B
    if CLIP:
        # Sums of squares in fp64: rows near 1e20 (fp32/bf16) overflow an fp32 sum, and the
        # norm itself is representable (as losses._common.row_norms does).
        ss1 = tl.zeros((BLOCK_R,), dtype=tl.float64)
        ss2 = tl.zeros((BLOCK_R,), dtype=tl.float64)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            m = r_mask[:, None] & (ks < K)[None, :]
            a = tl.load(z1_ptr + rows[:, None] * stride_1b + ks[None, :] * stride_1k, mask=m, other=0.0).to(tl.float64)
            b = tl.load(z2_ptr + rows[:, None] * stride_2b + ks[None, :] * stride_2k, mask=m, other=0.0).to(tl.float64)
            ss1 += tl.sum(a * a, axis=1)
            ss2 += tl.sum(b * b, axis=1)
        n1 = tl.sqrt(ss1).to(tl.float32)
        n2 = tl.sqrt(ss2).to(tl.float32)
        tl.store(n1_ptr + rows, n1, mask=r_mask)
        tl.store(n2_ptr + rows, n2, mask=r_mask)
        s1 = tl.where(n1 >= r, tl.div_rn(tl.full((BLOCK_R,), r, tl.float32), tl.maximum(n1, r)), 1.0)
        s2 = tl.where(n2 >= r, tl.div_rn(tl.full((BLOCK_R,), r, tl.float32), tl.maximum(n2, r)), 1.0)
    dd = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m = r_mask[:, None] & (ks < K)[None, :]
        a = tl.load(z1_ptr + rows[:, None] * stride_1b + ks[None, :] * stride_1k, mask=m, other=0.0)
        b = tl.load(z2_ptr + rows[:, None] * stride_2b + ks[None, :] * stride_2k, mask=m, other=0.0)
        if CLIP:
            a = (a.to(tl.float32) * s1[:, None]).to(z1c_ptr.dtype.element_ty)
            b = (b.to(tl.float32) * s2[:, None]).to(z2c_ptr.dtype.element_ty)
            tl.store(z1c_ptr + rows[:, None] * K + ks[None, :], a, mask=m)
            tl.store(z2c_ptr + rows[:, None] * K + ks[None, :], b, mask=m)
        dd += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(d_ptr + rows, dd, mask=r_mask)


@triton.jit
def pairwise_offdiag_kernel(
    x_ptr, y_ptr, out_ptr, out2_ptr, part_ptr,
    B, K, stride_b, stride_k, stride_os, stride_ob, stride_ok,
    alpha, beta, blocks_per_split,
    NEED_GRAD: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(B, BM), nC, nS), or (cdiv(B, BM), nC, 2·nS) with ``NEED_GRAD``: row block
    ``m`` of ``S = X Yᵀ`` against the column blocks ``[s·bps, (s+1)·bps)`` of split ``s``.
    ``X`` and ``Y`` share their strides.

    ``part[(m·nC + c)·nS + s] = Σ_{i in m, j≠i, j in split s} S_ij²`` (every ``c`` computes
    the same value; the launcher reads ``c = 0``).  With ``NEED_GRAD``:
    ``out[s, m, chunk c] = α·offdiag(S)[:, split s] Y[split s] (+ β·Y for s = 0)``,
    restricted to output columns ``[c·BC, (c+1)·BC)``; the launcher sums over ``s``.  The
    programs of the grid's second half (``nS ≤ pid < 2·nS`` on axis 2) do the same with
    ``X`` and ``Y`` swapped into ``out2`` (``offdiag(S)ᵀ X``: the other view's gradient), so
    one launch gives both gradients; they write no ``part``.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_s = tl.num_programs(2)
    side = 0
    if NEED_GRAD:
        n_s = n_s // 2
        side = pid_s // n_s
        pid_s = pid_s - side * n_s
        if side == 1:  # the (Y, X) side: same strides, so only the pointers change
            t_ptr = x_ptr
            x_ptr = y_ptr
            y_ptr = t_ptr
            out_ptr = out2_ptr
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < B
    cc = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cc_mask = cc < K
    cb_start = pid_s * blocks_per_split
    cb_end = tl.minimum(cb_start + blocks_per_split, tl.cdiv(B, BLOCK_N))
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for cb in range(cb_start, cb_end):
        cols = cb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = cols < B
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_mask = ks < K
            x = tl.load(x_ptr + rows[:, None] * stride_b + ks[None, :] * stride_k,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            yt = tl.load(y_ptr + cols[None, :] * stride_b + ks[:, None] * stride_k,
                         mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            s = dot_same(x, yt, s, IS_FP32, UPCAST)
        # masked rows/columns loaded as 0, so only the diagonal needs zeroing
        s = tl.where(rows[:, None] != cols[None, :], s, 0.0)
        sq += tl.sum(s * s, axis=1)
        if NEED_GRAD:
            yc = tl.load(y_ptr + cols[:, None] * stride_b + cc[None, :] * stride_k,
                         mask=n_mask[:, None] & cc_mask[None, :], other=0.0)
            acc = dot_same(s.to(yc.dtype), yc, acc, IS_FP32, UPCAST)
    slot = (pid_m.to(tl.int64) * tl.num_programs(1) + pid_c) * n_s + pid_s
    if side == 0:
        tl.store(part_ptr + slot, tl.sum(sq, axis=0))
    if NEED_GRAD:
        tile_mask = r_mask[:, None] & cc_mask[None, :]
        g = alpha * acc
        if pid_s == 0:  # β·Y once, in the first split's partial
            y_own = tl.load(y_ptr + rows[:, None] * stride_b + cc[None, :] * stride_k,
                            mask=tile_mask, other=0.0).to(tl.float32)
            g += beta * y_own
        out = out_ptr + pid_s.to(tl.int64) * stride_os
        tl.store(out + rows[:, None] * stride_ob + cc[None, :] * stride_ok, g, mask=tile_mask)


@triton.jit
def clip_rows_backward_kernel(
    z_ptr, n_ptr, g_ptr, z2_ptr, n2_ptr, g2_ptr, B, K, stride_zb, stride_zk, r, SPLITS,
    SUMS: tl.constexpr, CLIP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A view's gradient, in place on the contiguous fp32 ``g`` (B, K).  ``SUMS``: ``g`` is
    the first of ``SPLITS`` partials (one (SPLITS, B, K) buffer), which are summed into it
    in the fixed order 0, 1, ... first (the pairwise path splits its column stream at small
    B: one launch in place of two torch ops).  ``CLIP``: the clipping Jacobian, rows with
    ``||z_i|| >= r`` get ``(r/||z_i||)(g_i - z_i (z_i·g_i)/||z_i||²)``, the others are
    unchanged.  Grid (cdiv(B, BR), views): programs with ``pid 1 = 1`` do the same for
    ``(z2, n2, g2)``, which shares ``z``'s strides (one launch for both views).  The sum is
    a pass of its own: inside the Jacobian's first loop it held more registers (up to 147,
    and 32 B spilled at B = 1023, k = 512 on sm_90)."""
    pid = tl.program_id(0)
    if tl.program_id(1) == 1:
        z_ptr = z2_ptr
        n_ptr = n2_ptr
        g_ptr = g2_ptr
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < B
    if SUMS:
        split_stride = B.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            m = r_mask[:, None] & (ks < K)[None, :]
            offs = rows[:, None] * K + ks[None, :]
            g = tl.load(g_ptr + offs, mask=m, other=0.0)
            for s in range(1, SPLITS):
                g += tl.load(g_ptr + s * split_stride + offs, mask=m, other=0.0)
            tl.store(g_ptr + offs, g, mask=m)
    if CLIP:
        n = tl.load(n_ptr + rows, mask=r_mask, other=0.0)
        clipped = n >= r
        zg = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            m = r_mask[:, None] & (ks < K)[None, :]
            z = tl.load(z_ptr + rows[:, None] * stride_zb + ks[None, :] * stride_zk, mask=m,
                        other=0.0).to(tl.float32)
            g = tl.load(g_ptr + rows[:, None] * K + ks[None, :], mask=m, other=0.0)
            zg += tl.sum(z * g, axis=1)
        safe_n = tl.maximum(n, r)  # equals n on clipped rows; keeps the unused branch finite
        scale = tl.where(clipped, tl.div_rn(tl.full((BLOCK_R,), r, tl.float32), safe_n), 1.0)
        proj = tl.where(clipped, tl.div_rn(zg, safe_n * safe_n), 0.0)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            m = r_mask[:, None] & (ks < K)[None, :]
            z = tl.load(z_ptr + rows[:, None] * stride_zb + ks[None, :] * stride_zk, mask=m,
                        other=0.0).to(tl.float32)
            offs = rows[:, None] * K + ks[None, :]
            g = tl.load(g_ptr + offs, mask=m, other=0.0)
            tl.store(g_ptr + offs, scale[:, None] * (g - proj[:, None] * z), mask=m)
