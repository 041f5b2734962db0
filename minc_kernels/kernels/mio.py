"""Triton kernels of the MIO binary-contrastive loss (docs/math.md §3): @triton.jit code only.

Notation: ``z1, z2`` (B, k); ``Z = [ẑ1; ẑ2]`` (N = 2B rows, row-normalised); ``S = Z Zᵀ``.
The loss splits into per-pair terms (positives ``S[i, i+B] = ẑ1_i·ẑ2_i`` and the alignment
term ``||ẑ1_i - ẑ2_i||²``), computed exactly per row, and the negatives (every other
off-diagonal entry), streamed tile by tile, flash-attention style; S is never stored.

Launches (see :mod:`minc_kernels.ops.mio` for the launcher):

1. :func:`mio_normalize_rows`: ``ẑ`` (stored in the input dtype, the tensor-core operand,
   zero-padded to a row stride KS), the row norms, the positive softplus terms and their
   gradient coefficients, the alignment term; per-program partial sums.
2. Negatives, masked by index (no diagonal, no partner), either
   - k <= 256: :func:`mio_negative_tiles`, one pass: for a block of rows and a range of
     column blocks, ``S`` tile -> ``softplus(S/τn)`` summed and ``σ(S/τn) Ẑ_j``
     accumulated in registers (the negative part of ``dL/dẐ = 2 G Ẑ`` up to a constant); or
   - larger k: :func:`mio_negative_strip` (S tiles over k chunks -> loss partials and a
     strip of ``σ(S/τn)`` for a group of rows) then :func:`mio_strip_matmul`
     (``strip @ Ẑ``), group after group.
3. :func:`mio_loss_combine`: the loss from the partials (one program, fixed order).
4. :func:`mio_grad_finalize` (only when a gradient is needed): adds the positive and
   alignment gradients, sums the column-split partials in a fixed order and applies the
   Jacobian of ``ẑ = z / max(||z||, eps)``.

Every reduction is a per-program partial, summed in a fixed order afterwards: no atomics.
"""
import triton
import triton.language as tl

from .gram import dot_same


@triton.jit
def _ptx_unary(x, op: tl.constexpr):
    """One MUFU instruction (``ex2``/``lg2``/``rcp`` ``.approx.ftz.f32``) on an fp32 tensor."""
    return tl.inline_asm_elementwise(op + " $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _softplus_sigmoid(x, FAST_MATH: tl.constexpr):
    """``(softplus(x), sigmoid(x))`` in fp32, stable for any x.

    ``softplus(x) = max(x, 0) + log1p(e)``, ``e = exp(-|x|) <= 1``.  ``tl`` has no log1p:
    for ``e < 2^-6`` the series ``e - e²/2 + e³/3`` (relative error < 1e-6), else
    ``log(1 + e)`` (absolute error ~1e-7 on a value >= 0.0155).  ``sigmoid(x)`` is
    ``1/(1+e)`` or ``e/(1+e)`` by the sign of x.
    ``FAST_MATH`` (NVIDIA GPUs): exactly 3 MUFU ops, ``ex2/lg2/rcp.approx.ftz`` (relative
    errors ~2^-22; flushing subnormal ``e`` to 0 changes softplus by < 1e-38).  tl.log is
    libdevice's accurate logf (~20 instructions) and tl.exp/fdiv add subnormal fix-ups:
    this epilogue, not the tensor cores, bounds the tile kernel at k <= 128.
    Off (the interpreter, other GPUs): the tl functions.
    """
    if FAST_MATH:
        e = _ptx_unary(tl.abs(x) * -1.4426950408889634, "ex2.approx.ftz.f32")
        u = 1.0 + e
        log_u = _ptx_unary(u, "lg2.approx.ftz.f32") * 0.6931471805599453
        inv_u = _ptx_unary(u, "rcp.approx.ftz.f32")
    else:
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        log_u = tl.log(u)
        inv_u = 1.0 / u
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    l1p = tl.where(e < 0.015625, series, log_u)
    sp = tl.maximum(x, 0.0) + l1p
    sig = tl.where(x >= 0.0, inv_u, e * inv_u)
    return sp, sig


@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 ``x`` to ``dtype``, round to nearest even (as compiled Triton does).

    ``INTERP_BF16``: the interpreter truncates fp32 -> bf16 (a biased rounding that shrinks
    every ẑ); round the fp32 bits to the nearest even bf16 first, so truncation is exact.
    """
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mio_normalize_rows(
    z1_ptr, z2_ptr, zhat_ptr, norm_ptr, pos_coef_ptr, pos_part_ptr, reg_part_ptr,
    B, K, KS,
    s1r, s1c, s2r, s2c,
    inv_tp,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """Rows ``i`` of both views: ``ẑ = z/max(||z||, eps)`` -> ``zhat[i]``, ``zhat[i+B]``.

    ``zhat`` is (2B, KS), columns ``K..KS-1`` written as zeros (the tile kernel's padding).

    Also: ``norm[i], norm[i+B]`` (true norms, fp32); ``pos_coef[i] = -σ(-p_i/τp)/τp`` with
    ``p_i = ẑ1_i·ẑ2_i`` (``d softplus(-p/τp)/dp``); per-program partials
    ``pos_part = Σ softplus(-p_i/τp)`` and ``reg_part = Σ ||ẑ1_i - ẑ2_i||²``.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    offs = tl.arange(0, BLOCK_K)
    z1_row = z1_ptr + rows * s1r
    z2_row = z2_ptr + rows * s2r
    # Sums of squares in fp64: rows near 1e20 overflow an fp32 sum (losses._common.row_norms).
    ss1 = tl.zeros([BLOCK_R], dtype=tl.float64)
    ss2 = tl.zeros([BLOCK_R], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        cols = (k0 + offs).to(tl.int64)
        m = rmask[:, None] & (cols < K)[None, :]
        a = tl.load(z1_row[:, None] + cols[None, :] * s1c, mask=m, other=0.0).to(tl.float64)
        b = tl.load(z2_row[:, None] + cols[None, :] * s2c, mask=m, other=0.0).to(tl.float64)
        ss1 += tl.sum(a * a, axis=1)
        ss2 += tl.sum(b * b, axis=1)
    n1 = tl.sqrt(ss1).to(tl.float32)
    n2 = tl.sqrt(ss2).to(tl.float32)
    c1 = tl.maximum(n1, EPS)
    c2 = tl.maximum(n2, EPS)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    dsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, KS, BLOCK_K):
        cols = (k0 + offs).to(tl.int64)
        m = rmask[:, None] & (cols < K)[None, :]
        a = tl.load(z1_row[:, None] + cols[None, :] * s1c, mask=m, other=0.0).to(tl.float32)
        b = tl.load(z2_row[:, None] + cols[None, :] * s2c, mask=m, other=0.0).to(tl.float32)
        h1 = a / c1[:, None]
        h2 = b / c2[:, None]
        ms = rmask[:, None] & (cols < KS)[None, :]
        tl.store(zhat_ptr + rows[:, None] * KS + cols[None, :],
                 _round_to(h1, zhat_ptr.dtype.element_ty, INTERP_BF16), mask=ms)
        tl.store(zhat_ptr + (rows[:, None] + B) * KS + cols[None, :],
                 _round_to(h2, zhat_ptr.dtype.element_ty, INTERP_BF16), mask=ms)
        dot += tl.sum(h1 * h2, axis=1)
        diff = h1 - h2
        dsq += tl.sum(diff * diff, axis=1)
    tl.store(norm_ptr + rows, n1, mask=rmask)
    tl.store(norm_ptr + rows + B, n2, mask=rmask)
    sp, sig = _softplus_sigmoid(-dot * inv_tp, False)  # once per row: accurate log
    tl.store(pos_coef_ptr + rows, -sig * inv_tp, mask=rmask)
    tl.store(pos_part_ptr + pid, tl.sum(tl.where(rmask, sp, 0.0), axis=0))
    tl.store(reg_part_ptr + pid, tl.sum(tl.where(rmask, dsq, 0.0), axis=0))


@triton.jit
def _masked_logits(s, inv_tn, rows, partner, col0, r_lo, B, N,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``S/τn`` on the negatives, ``-1e4`` elsewhere (softplus and sigmoid of it are exactly 0).

    The index masks are built only for tiles that meet the diagonal, the partner diagonals
    (``j = i ± B``) or the edge N; interior tiles (almost all at large N) skip them.
    """
    x = s * inv_tn
    c_hi = col0 + BLOCK_N
    r_hi = r_lo + BLOCK_M
    special = ((r_hi > N) | (c_hi > N) | ((col0 < r_hi) & (c_hi > r_lo))
               | ((col0 < r_hi + B) & (c_hi > r_lo + B))
               | ((col0 < r_hi - B) & (c_hi > r_lo - B)))
    if special:
        cols = col0 + tl.arange(0, BLOCK_N)
        neg = ((rows < N)[:, None] & (cols < N)[None, :] & (rows[:, None] != cols[None, :])
               & (partner[:, None] != cols[None, :]))
        x = tl.where(neg, x, -1.0e4)
    return x


@triton.jit
def mio_negative_tiles(
    zhat_ptr, gpart_ptr, neg_part_ptr,
    B, N, KS,
    inv_tn, n_col_blocks, blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_IN_REGS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, IS_FP32: tl.constexpr,
    INTERP_BF16: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """Negatives of a block of rows against column blocks ``[s·bps, (s+1)·bps)`` (s = program 1).

    ``zhat`` is (N, KS), zero-padded beyond k to ``KS``, a multiple of ``BLOCK_K`` (so no
    k masks, aligned vector loads).  ``neg_part[s, m] = Σ softplus(S_ij/τn)`` over the
    negative (i, j) of the tile range; ``gpart[s, i, :] = Σ_j σ(S_ij/τn) ẑ_j`` (fp32, (N, KS)
    per split; the launcher scales and sums over s).
    ``ACC_IN_REGS`` (``KS == BLOCK_K``): the row tile and the gradient accumulator live in
    registers.  Otherwise S is accumulated over k chunks and the gradient accumulator
    lives in ``gpart`` (zero-initialised; each program owns its rows of its split: no races).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_m = tl.num_programs(0)
    # Indices (< N < 2^31) stay int32 for the per-element masks; pointers use int64 bases.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    partner = tl.where(rows < B, rows + B, rows - B)
    cb_start = pid_s * blocks_per_split
    cb_end = tl.minimum(cb_start + blocks_per_split, n_col_blocks)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # int64 only in the scalar block bases; in-tile offsets (< BLOCK·KS) stay int32.
    row_base = zhat_ptr + pid_m.to(tl.int64) * BLOCK_M * KS
    tile_offs_m = tl.arange(0, BLOCK_M)[:, None] * KS + offs_k[None, :]
    tile_offs_n = offs_n[:, None] * KS + offs_k[None, :]
    gbase = gpart_ptr + pid_s.to(tl.int64) * N * KS + pid_m.to(tl.int64) * BLOCK_M * KS
    loss_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ACC_IN_REGS:
        zi = tl.load(row_base + tile_offs_m, mask=rmask[:, None], other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for cb in range(cb_start, cb_end):
            col0 = cb * BLOCK_N
            cols = col0 + offs_n
            cmask = cols < N
            col_base = zhat_ptr + col0.to(tl.int64) * KS
            zj = tl.load(col_base + tile_offs_n, mask=cmask[:, None], other=0.0)
            s = dot_same(zi, tl.trans(zj), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                     IS_FP32, INTERP_BF16)
            x = _masked_logits(s, inv_tn, rows, partner, col0, pid_m * BLOCK_M, B, N,
                               BLOCK_M, BLOCK_N)
            sp, sig = _softplus_sigmoid(x, FAST_MATH)
            loss_acc += sp
            if COMPUTE_GRAD:
                g = _round_to(sig, zj.dtype, INTERP_BF16)
                acc = dot_same(g, zj, acc, IS_FP32, INTERP_BF16)
        if COMPUTE_GRAD:
            tl.store(gbase + tile_offs_m, acc, mask=rmask[:, None])
    else:
        for cb in range(cb_start, cb_end):
            col0 = cb * BLOCK_N
            cols = col0 + offs_n
            cmask = cols < N
            col_base = zhat_ptr + col0.to(tl.int64) * KS
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, KS, BLOCK_K):
                zi = tl.load(row_base + k0 + tile_offs_m, mask=rmask[:, None], other=0.0)
                zj = tl.load(col_base + k0 + tile_offs_n, mask=cmask[:, None], other=0.0)
                s = dot_same(zi, tl.trans(zj), s, IS_FP32, INTERP_BF16)
            x = _masked_logits(s, inv_tn, rows, partner, col0, pid_m * BLOCK_M, B, N,
                               BLOCK_M, BLOCK_N)
            sp, sig = _softplus_sigmoid(x, FAST_MATH)
            loss_acc += sp
            if COMPUTE_GRAD:
                g = _round_to(sig, zhat_ptr.dtype.element_ty, INTERP_BF16)
                for k0 in range(0, KS, BLOCK_K):
                    zj = tl.load(col_base + k0 + tile_offs_n, mask=cmask[:, None], other=0.0)
                    acc = tl.load(gbase + k0 + tile_offs_m, mask=rmask[:, None], other=0.0)
                    acc = dot_same(g, zj, acc, IS_FP32, INTERP_BF16)
                    tl.store(gbase + k0 + tile_offs_m, acc, mask=rmask[:, None])
    tl.store(neg_part_ptr + pid_s * n_m + pid_m, tl.sum(tl.sum(loss_acc, axis=1), axis=0))


@triton.jit
def mio_negative_strip(
    zhat_ptr, strip_ptr, neg_part_ptr,
    B, N, KS, NP, row0,
    inv_tn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, IS_FP32: tl.constexpr, INTERP_BF16: tl.constexpr,
    FAST_MATH: tl.constexpr,
):
    """Large k: one tile of ``S`` (rows ``row0 + program 0``, columns ``program 1``) over k chunks.

    ``neg_part[row block, column block] = Σ softplus(S_ij/τn)`` over its negatives and
    ``strip[i - row0, j] = σ(S_ij/τn)`` (0 off the negatives; input dtype; row stride NP).
    The launcher then forms ``strip @ Ẑ`` (:func:`mio_strip_matmul`): S is computed once
    and the gradient is a plain GEMM, with a strip of at most a few·k rows alive at a time.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local0 = pid_m * BLOCK_M
    rows = row0 + local0 + tl.arange(0, BLOCK_M)
    rmask = rows < N
    partner = tl.where(rows < B, rows + B, rows - B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    row_base = zhat_ptr + (row0 + local0).to(tl.int64) * KS
    col_base = zhat_ptr + (pid_n * BLOCK_N).to(tl.int64) * KS
    tile_offs_m = tl.arange(0, BLOCK_M)[:, None] * KS + offs_k[None, :]
    tile_offs_n = tl.arange(0, BLOCK_N)[:, None] * KS + offs_k[None, :]
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KS, BLOCK_K):
        zi = tl.load(row_base + k0 + tile_offs_m, mask=rmask[:, None], other=0.0)
        zj = tl.load(col_base + k0 + tile_offs_n, mask=cmask[:, None], other=0.0)
        s = dot_same(zi, tl.trans(zj), s, IS_FP32, INTERP_BF16)
    neg = (rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
           & (partner[:, None] != cols[None, :]))
    sp, sig = _softplus_sigmoid(s * inv_tn, FAST_MATH)
    part = tl.sum(tl.sum(tl.where(neg, sp, 0.0), axis=1), axis=0)
    tl.store(neg_part_ptr + (row0 // BLOCK_M + pid_m).to(tl.int64) * tl.num_programs(1) + pid_n,
             part)
    if COMPUTE_GRAD:
        g = _round_to(tl.where(neg, sig, 0.0), zhat_ptr.dtype.element_ty, INTERP_BF16)
        out = (strip_ptr + local0.to(tl.int64) * NP + pid_n * BLOCK_N
               + tl.arange(0, BLOCK_M)[:, None] * NP + tl.arange(0, BLOCK_N)[None, :])
        tl.store(out, g, mask=rmask[:, None])


@triton.jit
def mio_strip_matmul(
    strip_ptr, zhat_ptr, gpart_ptr,
    N, KS, NP, row0, n_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IS_FP32: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """``gpart[row0 + r, d] = Σ_j strip[r, j] ẑ_j[d]`` (fp32) for ``r < n_rows``.

    Program 0: a block of strip rows, program 1: a block of feature columns ``d``; a plain
    tiled GEMM over the N columns of the strip (fp32 accumulation, fixed order).
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lmask = local < n_rows
    offs_j = tl.arange(0, BLOCK_K)
    d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    dmask = d < KS
    a_ptrs = strip_ptr + (pid_m * BLOCK_M).to(tl.int64) * NP + (
        tl.arange(0, BLOCK_M)[:, None] * NP + offs_j[None, :])
    b_ptrs = zhat_ptr + (offs_j[:, None] * KS + d[None, :])
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, N, BLOCK_K):
        a = tl.load(a_ptrs, mask=lmask[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=(j0 + offs_j < N)[:, None] & dmask[None, :], other=0.0)
        acc = dot_same(a, b, acc, IS_FP32, INTERP_BF16)
        a_ptrs += BLOCK_K  # pointer increments: 64-bit, no int32 overflow of j·KS
        b_ptrs += BLOCK_K * KS
    out = (gpart_ptr + (row0 + pid_m * BLOCK_M).to(tl.int64) * KS
           + (tl.arange(0, BLOCK_M)[:, None] * KS + d[None, :]))
    tl.store(out, acc, mask=lmask[:, None] & dmask[None, :])


@triton.jit
def _grad_hat_chunk(z1_row, z2_row, s1c, s2c, g1_row, g2_row, n_splits, split_stride,
                    cols, m, c1, c2, pc, neg_scale, reg_scale):
    """One k chunk of rows i: ``(ẑ1, ẑ2, dL/dẑ1, dL/dẑ2)`` in fp32 (see mio_grad_finalize)."""
    h1 = tl.load(z1_row[:, None] + cols[None, :] * s1c, mask=m, other=0.0).to(tl.float32)
    h2 = tl.load(z2_row[:, None] + cols[None, :] * s2c, mask=m, other=0.0).to(tl.float32)
    h1 = h1 / c1[:, None]
    h2 = h2 / c2[:, None]
    q1 = tl.zeros(h1.shape, dtype=tl.float32)
    q2 = tl.zeros(h1.shape, dtype=tl.float32)
    for sp in range(0, n_splits):  # fixed order
        q1 += tl.load(g1_row[:, None] + sp * split_stride + cols[None, :], mask=m, other=0.0)
        q2 += tl.load(g2_row[:, None] + sp * split_stride + cols[None, :], mask=m, other=0.0)
    r = reg_scale * (h1 - h2)
    g1 = neg_scale * q1 + pc[:, None] * h2 + r
    g2 = neg_scale * q2 + pc[:, None] * h1 - r
    return h1, h2, g1, g2


@triton.jit
def mio_grad_finalize(
    z1_ptr, z2_ptr, norm_ptr, pos_coef_ptr, gpart_ptr, dz_ptr,
    B, N, K, KS, n_splits,
    s1r, s1c, s2r, s2c,
    neg_scale, pos_scale, reg_scale,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dz[i], dz[i+B] = J(z)ᵀ dL/dẑ`` (fp32, (2B, K)) for rows ``i`` of both views.

    ``gpart`` is (n_splits, 2B, KS) fp32, summed over splits in order.
    ``dL/dẑ1_i = neg_scale·Σ_s gpart[s, i] + pos_scale·pos_coef_i·ẑ2_i + reg_scale·(ẑ1_i - ẑ2_i)``
    (symmetrically for ẑ2_i).  ``J`` is the Jacobian of ``z / max(||z||, eps)`` as
    F.normalize's autograd has it: ``(g - ẑ(ẑ·g))/||z||`` if ``||z|| >= eps``, else ``g/eps``.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    offs = tl.arange(0, BLOCK_K)
    n1 = tl.load(norm_ptr + rows, mask=rmask, other=1.0)
    n2 = tl.load(norm_ptr + rows + B, mask=rmask, other=1.0)
    c1 = tl.maximum(n1, EPS)
    c2 = tl.maximum(n2, EPS)
    pc = tl.load(pos_coef_ptr + rows, mask=rmask, other=0.0) * pos_scale
    z1_row = z1_ptr + rows * s1r
    z2_row = z2_ptr + rows * s2r
    g1_row = gpart_ptr + rows * KS
    g2_row = gpart_ptr + (rows + B) * KS
    split_stride = N.to(tl.int64) * KS
    dot1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    dot2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    # Pass 1: ẑ·g per row (the projection needs the whole row); pass 2 recomputes g and writes.
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        m = rmask[:, None] & (cols < K)[None, :]
        h1, h2, g1, g2 = _grad_hat_chunk(z1_row, z2_row, s1c, s2c, g1_row, g2_row, n_splits,
                                         split_stride, cols, m, c1, c2, pc, neg_scale, reg_scale)
        dot1 += tl.sum(h1 * g1, axis=1)
        dot2 += tl.sum(h2 * g2, axis=1)
    dot1 = tl.where(n1 >= EPS, dot1, 0.0)  # clamped norm: no projection term
    dot2 = tl.where(n2 >= EPS, dot2, 0.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        m = rmask[:, None] & (cols < K)[None, :]
        h1, h2, g1, g2 = _grad_hat_chunk(z1_row, z2_row, s1c, s2c, g1_row, g2_row, n_splits,
                                         split_stride, cols, m, c1, c2, pc, neg_scale, reg_scale)
        d1 = (g1 - h1 * dot1[:, None]) / c1[:, None]
        d2 = (g2 - h2 * dot2[:, None]) / c2[:, None]
        tl.store(dz_ptr + rows[:, None] * K + cols[None, :], d1, mask=m)
        tl.store(dz_ptr + (rows[:, None] + B) * K + cols[None, :], d2, mask=m)


@triton.jit
def mio_loss_combine(
    pos_part_ptr, n_pos, neg_part_ptr, n_neg, reg_part_ptr, out_ptr,
    pos_scale, neg_scale, reg_scale,
    BLOCK: tl.constexpr,
):
    """``out = pos_scale·Σ pos_part + neg_scale·Σ neg_part + reg_scale·Σ reg_part`` (one program).

    Fixed-order sums of the per-program partials (``reg_part`` has ``n_pos`` entries, like
    ``pos_part``): one launch instead of a handful of tiny torch ops.
    """
    offs = tl.arange(0, BLOCK)
    pos = tl.zeros([BLOCK], dtype=tl.float32)
    reg = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_pos, BLOCK):
        m = i + offs < n_pos
        pos += tl.load(pos_part_ptr + i + offs, mask=m, other=0.0)
        reg += tl.load(reg_part_ptr + i + offs, mask=m, other=0.0)
    neg = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_neg, BLOCK):
        m = i + offs < n_neg
        neg += tl.load(neg_part_ptr + i + offs, mask=m, other=0.0)
    total = (pos_scale * tl.sum(pos, axis=0) + neg_scale * tl.sum(neg, axis=0)
             + reg_scale * tl.sum(reg, axis=0))
    tl.store(out_ptr, total)
