"""The shared Gram layer (kernels side): dot-precision helpers and the two Gram kernels.

Every loss on the Gram kernels uses these: MINC (docs/math.md §2) is ``rowmat_kernel`` plus
``moment_partial_kernel``; the spectral feature-Gram path uses both; the spectral pairwise
and MIO tile kernels use :func:`dot_same` for every ``tl.dot``.

* :func:`dot_same` / :func:`dot_g_tile` (with :func:`load_g_tile`, :func:`sum_pieces`):
  the one family of dot-precision helpers.
* :func:`grouped_tile` (through :func:`_tile`): the tile order of the three GEMM-shaped
  kernels below, by groups of row (or column) blocks, so the programs in flight share
  their operands in L2 (a permutation of the tiles: no value depends on it).
* :func:`gram_finish_kernel`: one pass over a k×k Gram's row-slice partials: the slices
  summed, the Frobenius partials of its off-diagonal and diagonal, and ``Γ = ∂L/∂G``
  (Barlow Twins' and VICReg's k×k paths, the spectral matrix path's ``offdiag(S)``).
* :func:`combine_kernel`: a loss from the partials of the kernels above, in one program
  (where a handful of tiny torch ops, a launch each, did it).
* :func:`moment_partial_kernel`: ``Σ_j x_j x_jᵀ`` (k×k) over a slice of rows, one fp32
  partial per row slice (the launcher sums the slices in a fixed order: no atomics).
* :func:`rowmat_kernel`: ``Q = X Gᵀ`` (row ``i`` is ``G x_i``) for a (B, k) ``X`` in its
  storage dtype and a fp32 (k, k) ``G`` (or, for large bf16 calls, ``G``'s bf16 pieces from
  :func:`split_bf16x3_kernel`), fused with the per-tile loss partials
  ``Σ x∘q`` and ``Σ x∘y`` and the row gradient ``α·Q + (β + γ·d_i)·y_i``.
  For MINC: ``X = p``, ``G = M``, ``Y = t``, ``α = 2/B``, ``β = -2/B``, ``γ = 0``.

Precision (``tl.dot`` input precision per input dtype; accumulation is always fp32):

* both operands in the storage dtype (``Xᵀ X``): fp32 inputs use ``input_precision="ieee"``
  (strict fp32, no TF32); bf16/fp16 inputs use the native half tensor-core dot.
* half ``X`` times the fp32 ``G`` (``MODE``): 0 = fp32 ``X``, ``"ieee"``;
  1 = bf16 ``X``, ``G`` split into three bf16 pieces (hi + mid + lo, 24 mantissa bits) and
  three bf16 dots (about fp32 accuracy at bf16 tensor-core speed);
  2 = fp16 ``X`` (exact in TF32), ``G`` split into two TF32-exact pieces and two
  ``input_precision="tf32"`` dots (about 2^-21 relative per product);
  3 = bf16 ``X`` and the three bf16 pieces of ``G`` split once beforehand
  (:func:`split_bf16x3_kernel`, a (3, K, K) buffer): the same pieces and the same dots in
  the same order as 1, so the same bits, but the pieces are loaded like ``X`` (async copies
  into shared memory, then wgmma) instead of being formed from fp32 tiles in registers by
  every program, in every iteration of its loop;
  4 = half ``X`` and a ``G`` the caller already rounded to that half dtype: one native dot
  (the spectral loss's B×B path, whose ``offdiag(S)`` is rounded as eager autograd and the
  pairwise kernel round it).
  Each piece's products go to an accumulator of their own, added smallest first after the
  loop (:func:`dot_g_tile`).  Rounding ``G`` to the half dtype instead would lose the fp32
  moment's precision (and can overflow fp16).  The CPU interpreter computes every dot in
  full fp32.

Offsets are int64.  No torch calls here.
"""
import triton
import triton.language as tl


@triton.jit
def dot_same(a, b, acc, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``, both in the storage dtype; strict fp32 (``ieee``) for fp32.

    ``UPCAST`` (set only under the CPU interpreter, whose ``tl.dot`` cannot multiply bf16)
    runs the half dot on fp32 copies: the same products, exact in fp32 either way.
    """
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IS_FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def split_bf16x3(m):
    """The bf16 pieces ``(hi, mid, lo)`` of a fp32 tensor, ``hi + mid + lo`` ≈ ``m`` to 24
    mantissa bits: what :func:`dot_g_tile`'s MODE 1 forms per tile."""
    hi = m.to(tl.bfloat16)
    r = m - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def split_bf16x3_kernel(g_ptr, out_ptr, K, stride_gr, stride_gc, BLOCK: tl.constexpr):
    """``out[0], out[1], out[2]`` = the hi, mid, lo bf16 pieces of the fp32 (K, K) ``G`` (any
    strides), each contiguous (K, K): the operand of ``rowmat_kernel``'s MODE 3."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    kk = K.to(tl.int64) * K
    mask = idx < kk
    m = tl.load(g_ptr + (idx // K) * stride_gr + (idx % K) * stride_gc, mask=mask, other=0.0)
    hi, mid, lo = split_bf16x3(m)
    tl.store(out_ptr + idx, hi, mask=mask)
    tl.store(out_ptr + kk + idx, mid, mask=mask)
    tl.store(out_ptr + 2 * kk + idx, lo, mask=mask)


@triton.jit
def load_g_tile(ptrs, mask, piece, MODE: tl.constexpr):
    """The ``G`` operand tile at ``ptrs``: the fp32 values (MODES 0-2, three times), or the
    three bf16 pieces ``(hi, mid, lo)`` ``piece`` elements apart (MODE 3)."""
    if MODE == 3:
        hi = tl.load(ptrs, mask=mask, other=0.0)
        mid = tl.load(ptrs + piece, mask=mask, other=0.0)
        lo = tl.load(ptrs + 2 * piece, mask=mask, other=0.0)
        return hi, mid, lo
    else:
        m = tl.load(ptrs, mask=mask, other=0.0)
        return m, m, m


@triton.jit
def dot_g_tile(x, g1, g2, g3, a1, a2, a3, MODE: tl.constexpr, UPCAST: tl.constexpr):
    """``x @ G`` for a tile from :func:`load_g_tile`, one accumulator per piece of ``G``:
    ``(a1, a2, a3)`` gain the hi, mid and lo products (MODES 1 and 3), the hi and lo TF32
    products (MODE 2, ``a3`` unused), the strict fp32 product (MODE 0, ``a1`` only) or the
    native half product of a half ``G`` (MODE 4, ``a1`` only).
    :func:`sum_pieces` adds them at the end.  Separate accumulators, not one chain: two or
    more dots into one accumulator in a loop body made Triton (3.8, sm_90) round-trip the
    accumulator through shared memory every iteration (12 shared stores and loads, 17
    barriers per iteration in a 64×64×32 bf16 tile loop; three accumulators: none, 2)."""
    if MODE == 0:
        a1 = tl.dot(x, g1, a1, input_precision="ieee")
    elif MODE == 4:
        a1 = dot_same(x, g1, a1, False, UPCAST)
    elif MODE == 2:
        xf = x.to(tl.float32)
        # truncate to the 10 explicit mantissa bits TF32 keeps: exact in TF32 whatever
        # the hardware's rounding, and g1 - hi is exact in fp32.
        hi = (g1.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        a1 = tl.dot(xf, hi, a1, input_precision="tf32")
        a2 = tl.dot(xf, g1 - hi, a2, input_precision="tf32")
    else:
        if MODE == 1:
            hi, mid, lo = split_bf16x3(g1)
        else:
            hi, mid, lo = g1, g2, g3
        a1 = dot_same(x, hi, a1, False, UPCAST)
        a2 = dot_same(x, mid, a2, False, UPCAST)
        a3 = dot_same(x, lo, a3, False, UPCAST)
    return a1, a2, a3


@triton.jit
def sum_pieces(a1, a2, a3, MODE: tl.constexpr):
    """The product from :func:`dot_g_tile`'s accumulators, smallest pieces first."""
    if MODE == 0 or MODE == 4:
        q = a1
    elif MODE == 2:
        q = a1 + a2
    else:
        q = a1 + (a2 + a3)
    return q


@triton.jit
def grouped_tile(lin, n_m, n_n, GROUP: tl.constexpr):
    """The ``(m, n)`` tile of the ``lin``-th program in launch order, over ``n_m × n_n``
    tiles, by groups of ``GROUP`` m-blocks: a group's programs take its m-blocks fastest,
    then the next n-block, so the programs in flight at once (about 264 on 132 SMs) share
    ``GROUP`` m-blocks and ``264 / GROUP`` n-blocks of the operands, not every m-block and
    two n-blocks: at k = 8192 with B >= 2048 that keeps what they read inside the 50 MB L2
    (``benchmarks/tile_order.py``, a model, not a measurement).  With ``n_m <= GROUP`` it is
    the launch order itself (m fastest).  A permutation of the tiles: no value changes."""
    per_group = GROUP * n_n
    first = (lin // per_group) * GROUP
    size = tl.minimum(n_m - first, GROUP)
    r = lin % per_group
    return first + r % size, r // size


@triton.jit
def _tile(GROUP: tl.constexpr):
    """This program's tile over the grid's first two axes: :func:`grouped_tile` of its
    launch index, or with ``GROUP = 0`` its program ids themselves (launch order, axis 0
    fastest: ``MINC_KERNELS_TILE_ORDER=launch``)."""
    if GROUP == 0:
        m = tl.program_id(0)
        n = tl.program_id(1)
    else:
        n_m = tl.num_programs(0)
        m, n = grouped_tile(tl.program_id(1) * n_m + tl.program_id(0), n_m, tl.num_programs(1),
                            GROUP)
    return m, n


@triton.jit
def slice_outer_product(x_ptr, y_ptr, ka, kb, ka_mask, kb_mask, row_start, row_end,
                        stride_xb, stride_xk, stride_yb, stride_yk,
                        IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """The (ka, kb) tile of ``Σ_{j in [row_start, row_end)} x_j y_jᵀ``, fp32: the one row loop
    of the Gram layer's ``XᵀX`` (``y_ptr = x_ptr``) and ``XᵀY`` kernels."""
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        r_mask = rows < row_end
        xa_t = tl.load(x_ptr + rows[None, :] * stride_xb + ka[:, None] * stride_xk,
                       mask=ka_mask[:, None] & r_mask[None, :], other=0.0)
        yb = tl.load(y_ptr + rows[:, None] * stride_yb + kb[None, :] * stride_yk,
                     mask=r_mask[:, None] & kb_mask[None, :], other=0.0)
        acc = dot_same(xa_t, yb, acc, IS_FP32, UPCAST)
    return acc


@triton.jit
def moment_partial_kernel(
    x_ptr, out_ptr, other_ptr, x2_ptr, out2_ptr, B, K, stride_xb, stride_xk, rows_per_split,
    IS_FP32: tl.constexpr, UPCAST: tl.constexpr, DOT_WITH_OTHER: tl.constexpr,
    VIEWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, GROUP: tl.constexpr,
):
    """``C_s = Σ_{j in slice s} x_j x_jᵀ`` over row slices; grid (nK, nK, S), or
    (nK, nK, 2·S) with ``VIEWS = 2``: the second half of axis 2 does the same for ``x2``
    (same shape and strides) into ``out2`` (two Grams, one launch).  Tiles ``(a, b)`` in the
    order of :func:`_tile` (``GROUP`` a-blocks at a time).

    Default: ``out[s] = C_s``, out (S, K, K) fp32.  Only tiles with ``a <= b`` compute; each
    also writes its mirror (the result is symmetric), halving the work.
    ``DOT_WITH_OTHER`` (one view): ``C_s`` is never stored; instead ``out[pid] = <other,
    C_s>_F`` restricted to this tile and its mirror (``other`` a symmetric, contiguous (K, K)
    fp32 matrix; the skipped ``a > b`` programs write 0 to their slots).  Summing ``out``
    gives ``<other, XᵀX>_F`` without a k×k write.
    """
    pid_a, pid_b = _tile(GROUP)
    pid_s = tl.program_id(2)
    if pid_a > pid_b:
        if DOT_WITH_OTHER:  # this slot of the partials holds nothing (no pre-zeroed buffer)
            pid = (pid_s.to(tl.int64) * tl.num_programs(1) + pid_b) * tl.num_programs(0) + pid_a
            tl.store(out_ptr + pid, 0.0)
        return
    if VIEWS == 2:
        n_s = tl.num_programs(2) // 2
        if pid_s >= n_s:
            pid_s = pid_s - n_s
            x_ptr = x2_ptr
            out_ptr = out2_ptr
    ka = pid_a.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kb = pid_b.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    ka_mask = ka < K
    kb_mask = kb < K
    row_start = pid_s.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, B)
    acc = slice_outer_product(x_ptr, x_ptr, ka, kb, ka_mask, kb_mask, row_start, row_end,
                              stride_xb, stride_xk, stride_xb, stride_xk,
                              IS_FP32, UPCAST, BLOCK_K, BLOCK_B)
    mask = ka_mask[:, None] & kb_mask[None, :]
    if DOT_WITH_OTHER:
        other = tl.load(other_ptr + ka[:, None] * K + kb[None, :], mask=mask, other=0.0)
        part = tl.sum(tl.sum(acc * other, axis=1), axis=0)
        if pid_a != pid_b:
            part = part * 2.0  # the mirrored tile contributes the same amount
        pid = (pid_s.to(tl.int64) * tl.num_programs(1) + pid_b) * tl.num_programs(0) + pid_a
        tl.store(out_ptr + pid, part)
    else:
        out = out_ptr + pid_s.to(tl.int64) * K * K
        tl.store(out + ka[:, None] * K + kb[None, :], acc, mask=mask)
        if pid_a != pid_b:
            tl.store(out + kb[None, :] * K + ka[:, None], acc, mask=mask)


@triton.jit
def rowmat_kernel(
    x_ptr, g_ptr, y_ptr, d_ptr, out_ptr, part_ptr,
    x2_ptr, g2_ptr, y2_ptr, d2_ptr, out2_ptr,
    B, K,
    stride_xb, stride_xk, stride_gr, stride_gc, stride_yb, stride_yk, stride_ob, stride_ok,
    alpha, beta, gamma,
    NEED_GRAD: tl.constexpr, GHA: tl.constexpr, HAS_D: tl.constexpr, MODE: tl.constexpr,
    UPCAST: tl.constexpr, VIEWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """One (BLOCK_M rows) × (BLOCK_N columns) tile of ``Q = X Gᵀ``, grid (cdiv(B, BM),
    cdiv(K, BN), VIEWS), tiles in the order of :func:`_tile` (``GROUP`` row blocks at a
    time).  Programs with ``pid 2 = 1`` (``VIEWS = 2``) do the same on ``(x2, g2, y2, d2)
    -> out2`` (each of the same strides as its first-view operand) and write the second half
    of ``part``: two products, one launch.

    Writes ``part[pid, 0] = Σ_tile x∘q`` and ``part[pid, 1] = Σ_tile x∘y`` (fp32), and with
    ``NEED_GRAD`` ``out = α·Q' + (β + γ·d_i)·y`` (fp32) where ``Q' = Q``, or with ``GHA``
    ``Q' = X LT(G)ᵀ`` (row ``i`` is ``LT(G) x_i``, lower triangle incl. the diagonal).  The
    loss partial always uses the full ``G``.  Under ``GHA`` only the reduction tiles that
    straddle the diagonal need a second (masked) dot.  ``G``: fp32 (K, K) of any strides,
    with ``MODE = 3`` its three bf16 pieces, (3, K, K) (pieces K² elements apart), with
    ``MODE = 4`` (K, K) in ``X``'s half dtype, any strides.
    """
    pid_m, pid_n = _tile(GROUP)
    if VIEWS == 2:
        if tl.program_id(2) == 1:
            x_ptr = x2_ptr
            g_ptr = g2_ptr
            y_ptr = y2_ptr
            d_ptr = d2_ptr
            out_ptr = out2_ptr
            part_ptr = part_ptr + tl.num_programs(0) * tl.num_programs(1) * 2
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < B
    c_mask = cols < K
    n0 = pid_n * BLOCK_N
    x_rows = x_ptr + rows[:, None] * stride_xb
    g_cols = g_ptr + cols[None, :] * stride_gr
    piece = K.to(tl.int64) * K  # MODE 3: G's bf16 pieces, (3, K, K)
    if GHA and NEED_GRAD:
        # Three loops with static structure (no branch inside: the pipeliner then issues
        # async copies and wgmma, which it does not across an `if` in the loop body):
        # 1. reduction tiles inside LT(G) (every j <= every n of the tile): one dot, into
        #    the LT accumulator only; 2. tiles straddling the diagonal: the full and the
        #    masked dot; 3. tiles above it: the full dot only.
        lo = ((n0 + 1) // BLOCK_K) * BLOCK_K  # tiles [0, lo) lie inside LT(G)
        hi = tl.minimum(((n0 + BLOCK_N - 1) // BLOCK_K + 1) * BLOCK_K, K)  # [lo, hi) straddle
        lo = tl.minimum(lo, K)
        # one accumulator per piece of G (dot_g_tile): l1-l3 for LT(G), a1-a3 for G
        l1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        l2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        l3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j0 in range(0, lo, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
            j_mask = js < K
            x = tl.load(x_rows + js[None, :] * stride_xk, mask=r_mask[:, None] & j_mask[None, :],
                        other=0.0)
            # gt[j, n] = G[n, j]
            g1, g2, g3 = load_g_tile(g_cols + js[:, None] * stride_gc,
                                     j_mask[:, None] & c_mask[None, :], piece, MODE)
            l1, l2, l3 = dot_g_tile(x, g1, g2, g3, l1, l2, l3, MODE, UPCAST)
        a1, a2, a3 = l1, l2, l3  # the inner tiles count in full Q as well
        for j0 in range(lo, hi, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
            j_mask = js < K
            x = tl.load(x_rows + js[None, :] * stride_xk, mask=r_mask[:, None] & j_mask[None, :],
                        other=0.0)
            g1, g2, g3 = load_g_tile(g_cols + js[:, None] * stride_gc,
                                     j_mask[:, None] & c_mask[None, :], piece, MODE)
            a1, a2, a3 = dot_g_tile(x, g1, g2, g3, a1, a2, a3, MODE, UPCAST)
            lt = js[:, None] <= cols[None, :]
            l1, l2, l3 = dot_g_tile(x, tl.where(lt, g1, 0.0), tl.where(lt, g2, 0.0),
                                    tl.where(lt, g3, 0.0), l1, l2, l3, MODE, UPCAST)
        for j0 in range(hi, K, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
            j_mask = js < K
            x = tl.load(x_rows + js[None, :] * stride_xk, mask=r_mask[:, None] & j_mask[None, :],
                        other=0.0)
            g1, g2, g3 = load_g_tile(g_cols + js[:, None] * stride_gc,
                                     j_mask[:, None] & c_mask[None, :], piece, MODE)
            a1, a2, a3 = dot_g_tile(x, g1, g2, g3, a1, a2, a3, MODE, UPCAST)
        acc = sum_pieces(a1, a2, a3, MODE)
        acc_lt = sum_pieces(l1, l2, l3, MODE)
    else:
        a1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j0 in range(0, K, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
            j_mask = js < K
            x = tl.load(x_rows + js[None, :] * stride_xk, mask=r_mask[:, None] & j_mask[None, :],
                        other=0.0)
            g1, g2, g3 = load_g_tile(g_cols + js[:, None] * stride_gc,
                                     j_mask[:, None] & c_mask[None, :], piece, MODE)
            a1, a2, a3 = dot_g_tile(x, g1, g2, g3, a1, a2, a3, MODE, UPCAST)
        acc = sum_pieces(a1, a2, a3, MODE)
    tile_mask = r_mask[:, None] & c_mask[None, :]
    xn = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xk,
                 mask=tile_mask, other=0.0).to(tl.float32)
    yn = tl.load(y_ptr + rows[:, None] * stride_yb + cols[None, :] * stride_yk,
                 mask=tile_mask, other=0.0).to(tl.float32)
    pid = pid_m.to(tl.int64) * tl.num_programs(1) + pid_n
    tl.store(part_ptr + pid * 2, tl.sum(tl.sum(xn * acc, axis=1), axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(tl.sum(xn * yn, axis=1), axis=0))
    if NEED_GRAD:
        if GHA:
            q = acc_lt
        else:
            q = acc
        if HAS_D:
            d = tl.load(d_ptr + rows, mask=r_mask, other=0.0)
            coef = beta + gamma * d
        else:
            coef = tl.full((BLOCK_M,), beta, dtype=tl.float32)
        g = alpha * q + coef[:, None] * yn
        tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :] * stride_ok, g, mask=tile_mask)


# ----------------------------------------------------------------------------- column statistics
# The per-column prologue/epilogue of the Barlow Twins and VICReg losses (docs/math.md §7-8):
# batch standardisation / centring of two views before their Grams, and its Jacobian after.


@triton.jit
def round_bf16_rne(x):
    """fp32 ``x`` rounded to the nearest bfloat16 (ties to even), still fp32 (exact in bf16).

    The CPU interpreter's fp32 -> bf16 conversion truncates (rounds toward zero), a bias
    that the GPU's conversion does not have; kernels that store rounded values call this
    first under the interpreter (``RNE_BF16``) so both round as torch does."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _col_moments(x_ptr, y_ptr, stride_xb, stride_xk, stride_yb, stride_yk, cols, c_mask,
                 r_lo, r_hi, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Over the rows ``[r_lo, r_hi)`` of the columns ``cols`` (fp32, two passes): the means of
    ``X`` and ``Y``, ``M2 = Σ (x - m)²`` about those means, and ``Σ (x - y)²``."""
    sx = tl.zeros((BLOCK_K,), dtype=tl.float32)
    sy = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        m = (rows < r_hi)[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xk, mask=m, other=0.0)
        y = tl.load(y_ptr + rows[:, None] * stride_yb + cols[None, :] * stride_yk, mask=m, other=0.0)
        sx += tl.sum(x.to(tl.float32), axis=0)
        sy += tl.sum(y.to(tl.float32), axis=0)
    mx = sx / (r_hi - r_lo)
    my = sy / (r_hi - r_lo)
    m2x = tl.zeros((BLOCK_K,), dtype=tl.float32)
    m2y = tl.zeros((BLOCK_K,), dtype=tl.float32)
    d2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        m = (rows < r_hi)[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xk, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_yb + cols[None, :] * stride_yk, mask=m, other=0.0).to(tl.float32)
        cx = tl.where(m, x - mx[None, :], 0.0)
        cy = tl.where(m, y - my[None, :], 0.0)
        m2x += tl.sum(cx * cx, axis=0)
        m2y += tl.sum(cy * cy, axis=0)
        d2 += tl.sum((x - y) * (x - y), axis=0)
    return mx, my, m2x, m2y, d2


@triton.jit
def colstats_partial_kernel(
    x_ptr, y_ptr, part_ptr, B, K, stride_xb, stride_xk, stride_yb, stride_yk, rows_per_split,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """First stage of the row-split :func:`colstats_kernel`; grid (cdiv(K, BK), slices).

    Slice ``s`` (rows ``[s·R, min(B, (s+1)·R))``, ``R = rows_per_split``) writes, for its
    columns, its own means, ``M2`` about them and ``Σ (x - y)²`` into ``part`` (slices, 8, K)
    fp32, rows 0-4 (x mean, y mean, x M2, y M2, d2); rows 5-7 are the second stage's."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_mask = cols < K
    r_lo = pid_s * rows_per_split
    r_hi = tl.minimum(B, r_lo + rows_per_split)
    mx, my, m2x, m2y, d2 = _col_moments(x_ptr, y_ptr, stride_xb, stride_xk, stride_yb,
                                        stride_yk, cols, c_mask, r_lo, r_hi, BLOCK_B, BLOCK_K)
    out = part_ptr + pid_s.to(tl.int64) * 8 * K + cols
    tl.store(out + 0 * K, mx, mask=c_mask)
    tl.store(out + 1 * K, my, mask=c_mask)
    tl.store(out + 2 * K, m2x, mask=c_mask)
    tl.store(out + 3 * K, m2y, mask=c_mask)
    tl.store(out + 4 * K, d2, mask=c_mask)


@triton.jit
def colstats_kernel(
    x_ptr, y_ptr, xo_ptr, yo_ptr, stats_ptr, part_ptr, B, K,
    stride_xb, stride_xk, stride_yb, stride_yk,
    stride_xob, stride_xok, stride_yob, stride_yok, eps, rows_per_split,
    STANDARDIZE: tl.constexpr, RNE_BF16: tl.constexpr, SPLIT: tl.constexpr,
    SPLIT_P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Columns ``[pid·BK, (pid+1)·BK)`` of two (B, K) views ``X``, ``Y``; grid
    (cdiv(K, BK), slices).

    Three passes over the rows (fp32): column means; ``M2 = Σ (x - m)²`` and the invariance
    partial ``Σ (x - y)²``; then the output rows ``xo = (x - m)·s`` in the output's dtype
    (``s = 1/sqrt(M2/B + eps)`` with ``STANDARDIZE``, else 1: centring) at any strides, with
    ``Σ xo²`` and ``Σ xo∘yo`` of the rounded outputs.  ``stats`` is (10, K) fp32:
    rows 0-1 means, 2-3 ``M2``, 4-5 ``s``, 6-7 ``Σ xo²``, ``Σ yo²``, 8 ``Σ xo∘yo``,
    9 ``Σ (x - y)²`` (rows ``x`` then ``y``).  ``RNE_BF16``: see :func:`round_bf16_rne`.

    ``SPLIT`` (row split, when the column blocks alone would leave SMs idle): the first two
    passes were done per row slice by :func:`colstats_partial_kernel`; every program merges
    the slices' partials of its columns (Chan et al.'s pairwise update:
    ``M2 = Σ_s M2_s + n_s (m_s - m)²``), then writes the outputs of its own slice only, and
    its ``Σ xo²``, ``Σ yo²``, ``Σ xo∘yo`` into ``part`` rows 5-7 (the launcher sums the
    slices in order); slice 0 stores ``stats`` rows 0-5 and 9.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_mask = cols < K
    if SPLIT:
        # the slices' partials of these columns as one (SPLIT_P, BK) tile per quantity
        sl = tl.arange(0, SPLIT_P)
        s_mask = sl < tl.num_programs(1)
        n_s = tl.where(s_mask, tl.minimum(rows_per_split, B - sl * rows_per_split), 0)
        n_s = n_s.to(tl.float32)[:, None]
        src = part_ptr + sl.to(tl.int64)[:, None] * 8 * K + cols[None, :]
        pm = s_mask[:, None] & c_mask[None, :]
        px = tl.load(src + 0 * K, mask=pm, other=0.0)
        py = tl.load(src + 1 * K, mask=pm, other=0.0)
        mx = tl.sum(n_s * px, axis=0) / B
        my = tl.sum(n_s * py, axis=0) / B
        dx = px - mx[None, :]
        dy = py - my[None, :]
        m2x = tl.sum(tl.load(src + 2 * K, mask=pm, other=0.0) + n_s * dx * dx, axis=0)
        m2y = tl.sum(tl.load(src + 3 * K, mask=pm, other=0.0) + n_s * dy * dy, axis=0)
        d2 = tl.sum(tl.load(src + 4 * K, mask=pm, other=0.0), axis=0)
        r_lo = pid_s * rows_per_split
        r_hi = tl.minimum(B, r_lo + rows_per_split)
    else:
        mx, my, m2x, m2y, d2 = _col_moments(x_ptr, y_ptr, stride_xb, stride_xk, stride_yb,
                                            stride_yk, cols, c_mask, 0, B, BLOCK_B, BLOCK_K)
        r_lo = 0
        r_hi = B
    if STANDARDIZE:
        one = tl.full((BLOCK_K,), 1.0, tl.float32)
        scx = tl.div_rn(one, tl.sqrt_rn(m2x / B + eps))
        scy = tl.div_rn(one, tl.sqrt_rn(m2y / B + eps))
    else:
        scx = tl.full((BLOCK_K,), 1.0, tl.float32)
        scy = tl.full((BLOCK_K,), 1.0, tl.float32)
    # stored before the output pass, so that M2 and d2 are not held across it;
    # every slice merged the same values: slice 0 stores them
    first = c_mask & (pid_s == 0)
    tl.store(stats_ptr + 0 * K + cols, mx, mask=first)
    tl.store(stats_ptr + 1 * K + cols, my, mask=first)
    tl.store(stats_ptr + 2 * K + cols, m2x, mask=first)
    tl.store(stats_ptr + 3 * K + cols, m2y, mask=first)
    tl.store(stats_ptr + 4 * K + cols, scx, mask=first)
    tl.store(stats_ptr + 5 * K + cols, scy, mask=first)
    tl.store(stats_ptr + 9 * K + cols, d2, mask=first)
    qx = tl.zeros((BLOCK_K,), dtype=tl.float32)
    qy = tl.zeros((BLOCK_K,), dtype=tl.float32)
    xy = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for r0 in range(0, r_hi - r_lo, BLOCK_B):
        rows = r_lo + r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        m = (rows < r_hi)[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xk, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_yb + cols[None, :] * stride_yk, mask=m, other=0.0).to(tl.float32)
        xo = (x - mx[None, :]) * scx[None, :]
        yo = (y - my[None, :]) * scy[None, :]
        if RNE_BF16:
            xo = round_bf16_rne(xo)
            yo = round_bf16_rne(yo)
        xo = xo.to(xo_ptr.dtype.element_ty)
        yo = yo.to(yo_ptr.dtype.element_ty)
        tl.store(xo_ptr + rows[:, None] * stride_xob + cols[None, :] * stride_xok, xo, mask=m)
        tl.store(yo_ptr + rows[:, None] * stride_yob + cols[None, :] * stride_yok, yo, mask=m)
        xf = tl.where(m, xo.to(tl.float32), 0.0)
        yf = tl.where(m, yo.to(tl.float32), 0.0)
        qx += tl.sum(xf * xf, axis=0)
        qy += tl.sum(yf * yf, axis=0)
        xy += tl.sum(xf * yf, axis=0)
    # c_mask again, from 32-bit column indices: the same predicate, a value of its own, so
    # that ptxas need not keep c_mask's predicate across the loop (at 80 registers it
    # spilled it: 4 B of local memory, fp16/bf16 transposed outputs)
    end_mask = pid * BLOCK_K + tl.arange(0, BLOCK_K) < K
    if SPLIT:
        dst = part_ptr + pid_s.to(tl.int64) * 8 * K + cols
        tl.store(dst + 5 * K, qx, mask=end_mask)
        tl.store(dst + 6 * K, qy, mask=end_mask)
        tl.store(dst + 7 * K, xy, mask=end_mask)
    else:
        tl.store(stats_ptr + 6 * K + cols, qx, mask=end_mask)
        tl.store(stats_ptr + 7 * K + cols, qy, mask=end_mask)
        tl.store(stats_ptr + 8 * K + cols, xy, mask=end_mask)


@triton.jit
def _grad_col_sums(gx_ptr, gy_ptr, nx_ptr, ny_ptr, stride_gxb, stride_gxk, stride_gyb,
                   stride_gyk, stride_nxb, stride_nxk, stride_nyb, stride_nyk, cols, c_mask,
                   r_lo, r_hi, STANDARDIZE: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Over the rows ``[r_lo, r_hi)``: ``Σ g`` of both views and, with ``STANDARDIZE``,
    ``Σ g∘n`` (zeros otherwise)."""
    sgx = tl.zeros((BLOCK_K,), dtype=tl.float32)
    sgy = tl.zeros((BLOCK_K,), dtype=tl.float32)
    snx = tl.zeros((BLOCK_K,), dtype=tl.float32)
    sny = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        m = (rows < r_hi)[:, None] & c_mask[None, :]
        gx = tl.load(gx_ptr + rows[:, None] * stride_gxb + cols[None, :] * stride_gxk, mask=m, other=0.0)
        gy = tl.load(gy_ptr + rows[:, None] * stride_gyb + cols[None, :] * stride_gyk, mask=m, other=0.0)
        sgx += tl.sum(gx, axis=0)
        sgy += tl.sum(gy, axis=0)
        if STANDARDIZE:
            nx = tl.load(nx_ptr + rows[:, None] * stride_nxb + cols[None, :] * stride_nxk, mask=m, other=0.0).to(tl.float32)
            ny = tl.load(ny_ptr + rows[:, None] * stride_nyb + cols[None, :] * stride_nyk, mask=m, other=0.0).to(tl.float32)
            snx += tl.sum(gx * nx, axis=0)
            sny += tl.sum(gy * ny, axis=0)
    return sgx, sgy, snx, sny


@triton.jit
def colstats_backward_partial_kernel(
    gx_ptr, gy_ptr, nx_ptr, ny_ptr, part_ptr, B, K,
    stride_gxb, stride_gxk, stride_gyb, stride_gyk, stride_nxb, stride_nxk,
    stride_nyb, stride_nyk, rows_per_split,
    STANDARDIZE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """First stage of the row-split :func:`colstats_backward_kernel`; grid (cdiv(K, BK),
    slices): slice ``s`` writes its ``Σ g`` (both views) and ``Σ g∘n`` into ``part``
    (slices, 4, K) fp32."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_mask = cols < K
    r_lo = pid_s * rows_per_split
    r_hi = tl.minimum(B, r_lo + rows_per_split)
    sgx, sgy, snx, sny = _grad_col_sums(
        gx_ptr, gy_ptr, nx_ptr, ny_ptr, stride_gxb, stride_gxk, stride_gyb, stride_gyk,
        stride_nxb, stride_nxk, stride_nyb, stride_nyk, cols, c_mask, r_lo, r_hi,
        STANDARDIZE, BLOCK_B, BLOCK_K)
    out = part_ptr + pid_s.to(tl.int64) * 4 * K + cols
    tl.store(out + 0 * K, sgx, mask=c_mask)
    tl.store(out + 1 * K, sgy, mask=c_mask)
    tl.store(out + 2 * K, snx, mask=c_mask)
    tl.store(out + 3 * K, sny, mask=c_mask)


@triton.jit
def colstats_backward_kernel(
    gx_ptr, gy_ptr, nx_ptr, ny_ptr, x_ptr, y_ptr, stats_ptr, part_ptr, ox_ptr, oy_ptr, B, K,
    stride_gxb, stride_gxk, stride_gyb, stride_gyk, stride_nxb, stride_nxk,
    stride_nyb, stride_nyk, stride_xb, stride_xk, stride_yb, stride_yk, inv_coef,
    rows_per_split,
    STANDARDIZE: tl.constexpr, INVARIANCE: tl.constexpr, SPLIT: tl.constexpr,
    SPLIT_P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The Jacobian of :func:`colstats_kernel`'s outputs, per column block; grid
    (cdiv(K, BK), slices).

    For each view, ``g`` (fp32, any strides) is the gradient with respect to the output
    ``n``: ``o = s·(g - mean(g) - n·mean(g∘n))`` with ``STANDARDIZE`` (``n`` the rounded
    standardised rows, ``s`` from ``stats`` row 4/5), else ``o = g - mean(g)`` (centring).
    ``INVARIANCE`` adds ``±inv_coef·(x - y)`` (``+`` for ``X``, ``-`` for ``Y``).
    ``ox``, ``oy``: contiguous fp32 (B, K).  ``SPLIT``: the column sums come from the slices'
    partials (:func:`colstats_backward_partial_kernel`, summed in slice order) and each
    program writes its own slice of rows.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_mask = cols < K
    if SPLIT:  # the slices' sums of these columns, as (SPLIT_P, BK) tiles
        sl = tl.arange(0, SPLIT_P)
        src = part_ptr + sl.to(tl.int64)[:, None] * 4 * K + cols[None, :]
        pm = (sl < tl.num_programs(1))[:, None] & c_mask[None, :]
        sgx = tl.sum(tl.load(src + 0 * K, mask=pm, other=0.0), axis=0)
        sgy = tl.sum(tl.load(src + 1 * K, mask=pm, other=0.0), axis=0)
        snx = tl.sum(tl.load(src + 2 * K, mask=pm, other=0.0), axis=0)
        sny = tl.sum(tl.load(src + 3 * K, mask=pm, other=0.0), axis=0)
        r_lo = pid_s * rows_per_split
        r_hi = tl.minimum(B, r_lo + rows_per_split)
    else:
        sgx, sgy, snx, sny = _grad_col_sums(
            gx_ptr, gy_ptr, nx_ptr, ny_ptr, stride_gxb, stride_gxk, stride_gyb, stride_gyk,
            stride_nxb, stride_nxk, stride_nyb, stride_nyk, cols, c_mask, 0, B,
            STANDARDIZE, BLOCK_B, BLOCK_K)
        r_lo = 0
        r_hi = B
    mgx = sgx / B
    mgy = sgy / B
    mnx = snx / B
    mny = sny / B
    if STANDARDIZE:
        scx = tl.load(stats_ptr + 4 * K + cols, mask=c_mask, other=0.0)
        scy = tl.load(stats_ptr + 5 * K + cols, mask=c_mask, other=0.0)
    for r0 in range(0, r_hi - r_lo, BLOCK_B):
        rows = r_lo + r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        m = (rows < r_hi)[:, None] & c_mask[None, :]
        gx = tl.load(gx_ptr + rows[:, None] * stride_gxb + cols[None, :] * stride_gxk, mask=m, other=0.0)
        gy = tl.load(gy_ptr + rows[:, None] * stride_gyb + cols[None, :] * stride_gyk, mask=m, other=0.0)
        ox = gx - mgx[None, :]
        oy = gy - mgy[None, :]
        if STANDARDIZE:
            nx = tl.load(nx_ptr + rows[:, None] * stride_nxb + cols[None, :] * stride_nxk, mask=m, other=0.0).to(tl.float32)
            ny = tl.load(ny_ptr + rows[:, None] * stride_nyb + cols[None, :] * stride_nyk, mask=m, other=0.0).to(tl.float32)
            ox = scx[None, :] * (ox - nx * mnx[None, :])
            oy = scy[None, :] * (oy - ny * mny[None, :])
        if INVARIANCE:
            x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xk, mask=m, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + rows[:, None] * stride_yb + cols[None, :] * stride_yk, mask=m, other=0.0).to(tl.float32)
            ox += inv_coef * (x - y)
            oy -= inv_coef * (x - y)
        tl.store(ox_ptr + rows[:, None] * K + cols[None, :], ox, mask=m)
        tl.store(oy_ptr + rows[:, None] * K + cols[None, :], oy, mask=m)


@triton.jit
def colstats_terms_kernel(
    stats_ptr, coef_ptr, base_ptr, K, n_f, eps, h_num, h_den, alpha,
    c_inv, c_hinge, c_diag, lam, VICREG: tl.constexpr, PAIRWISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The k-element terms of the Barlow Twins / VICReg losses after :func:`colstats_kernel`,
    in one program (grid (1,)): what was a dozen to thirty small torch ops per call.

    Reads ``stats`` (10, K); writes ``coef`` (2, K) fp32 (the per-column vectors the Gram
    launches take) and ``base`` (a 0-dim fp32: the loss without its Gram term).

    ``VICREG`` (centring stats; docs/math.md §8): per view ``s = sqrt(M2/(N-1) + eps)``,
    ``h = h_num / (h_den·s)`` where ``s < 1``, else 0 (``h_num = -μ``,
    ``h_den = 2K(N-1)``); ``coef`` = ``h - α Σ zc²`` with ``PAIRWISE`` (the N×N gradient's
    diagonal term), else ``h``; ``base = c_inv Σ (za-zb)² + c_hinge Σ_views Σ relu(1 - s)``
    ``- c_diag Σ_views Σ (Σ zc²)²`` (``PAIRWISE``: the k×k Gram's diagonal, which the N×N
    Frobenius norm includes; ``c_diag = 0`` otherwise).
    Barlow Twins (§7, the N×N path): ``d = C_ii`` = ``stats[8, i] / n_f`` (the
    standardised views' column dots), ``coef`` = ``d`` and ``2d - 2``
    (the diagonal of ``∂L/∂C``), ``base = Σ (1 - d)² - λ Σ d²``.  ``n_f`` is N as a float;
    divisions are IEEE-rounded, as torch's."""
    acc0 = tl.zeros((BLOCK,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, K, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = cols < K
        if VICREG:
            acc0 += tl.load(stats_ptr + 9 * K + cols, mask=m, other=0.0)
            for v in tl.static_range(2):
                m2 = tl.load(stats_ptr + (2 + v) * K + cols, mask=m, other=0.0)
                s = tl.sqrt_rn(tl.div_rn(m2, n_f - 1.0) + eps)
                acc1 += tl.where(m, tl.maximum(1.0 - s, 0.0), 0.0)
                h = tl.where(s < 1.0, tl.div_rn(tl.full((BLOCK,), h_num, tl.float32), h_den * s),
                             0.0)
                if PAIRWISE:
                    sq = tl.load(stats_ptr + (6 + v) * K + cols, mask=m, other=0.0)
                    h = h - alpha * sq
                    acc2 += sq * sq
                tl.store(coef_ptr + v * K + cols, h, mask=m)
        else:
            d = tl.div_rn(tl.load(stats_ptr + 8 * K + cols, mask=m, other=0.0), n_f)
            tl.store(coef_ptr + cols, d, mask=m)
            tl.store(coef_ptr + K + cols, 2.0 * d - 2.0, mask=m)
            acc0 += tl.where(m, (1.0 - d) * (1.0 - d), 0.0)
            acc1 += d * d
    if VICREG:
        base = c_inv * tl.sum(acc0, axis=0) + c_hinge * tl.sum(acc1, axis=0) \
            - c_diag * tl.sum(acc2, axis=0)
    else:
        base = tl.sum(acc0, axis=0) - lam * tl.sum(acc1, axis=0)
    tl.store(base_ptr, base)


@triton.jit
def cross_gram_kernel(
    x_ptr, y_ptr, out_ptr, B, K, stride_xb, stride_xk, stride_yb, stride_yk, rows_per_split,
    IS_FP32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    GROUP: tl.constexpr,
):
    """``C_s = Σ_{j in slice s} x_j y_jᵀ`` (``Xᵀ Y`` over a slice of rows); grid (nK, nK, S),
    ``out[s]`` (S, K, K) fp32 (the launcher sums the slices in a fixed order), tiles in the
    order of :func:`_tile`.  Unlike :func:`moment_partial_kernel` every tile computes
    (``Xᵀ Y`` is not symmetric)."""
    pid_a, pid_b = _tile(GROUP)
    pid_s = tl.program_id(2)
    ka = pid_a.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kb = pid_b.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    ka_mask = ka < K
    kb_mask = kb < K
    row_start = pid_s.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, B)
    acc = slice_outer_product(x_ptr, y_ptr, ka, kb, ka_mask, kb_mask, row_start, row_end,
                              stride_xb, stride_xk, stride_yb, stride_yk,
                              IS_FP32, UPCAST, BLOCK_K, BLOCK_B)
    out = out_ptr + pid_s.to(tl.int64) * K * K
    tl.store(out + ka[:, None] * K + kb[None, :], acc, mask=ka_mask[:, None] & kb_mask[None, :])


@triton.jit
def _slices_tile(src, idx, mask, SPLIT, kk, scale):
    """``scale · Σ_s src[s]`` over the tile ``idx`` of SPLIT (K, K) fp32 slices ``kk``
    elements apart, added in order 0, 1, ..."""
    acc = tl.load(src + idx, mask=mask, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(src + s * kk + idx, mask=mask, other=0.0)
    return acc * scale


@triton.jit
def _store_tile(ptr, idx, val, mask, RNE_BF16: tl.constexpr):
    """``val`` (fp32) stored in ``ptr``'s dtype (round to nearest even under
    ``RNE_BF16``: the interpreter's bf16, see :func:`round_bf16_rne`)."""
    if RNE_BF16:
        val = round_bf16_rne(val)
    tl.store(ptr + idx, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def gram_finish_kernel(part_ptr, coef_ptr, gam_ptr, gam_t_ptr, sq_ptr, K, SPLIT, gam_views,
                       scale, mul, DIAG: tl.constexpr, PAIR: tl.constexpr,
                       NEED_GRAD: tl.constexpr, TRANSPOSE: tl.constexpr,
                       RNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a k×k Gram's row-slice partials, tile ``(i, j)`` of view ``v`` (grid
    ``(cdiv(K, BLOCK), cdiv(K, BLOCK), views)``): what the Frobenius terms of a loss and its
    ``Γ = ∂L/∂G`` need, where a sum of slices and five to eight torch ops did it.

    ``G = scale · Σ_s part[v, s]`` (``part``: (views, SPLIT, K, K) fp32 contiguous, slices
    added in order 0, 1, ...).  ``sq[t] = (Σ_{i≠j} G_ij², D)`` per tile ``t`` (a (tiles, 2)
    fp32 array, view-major), ``D = Σ_i (1 - G_ii)²`` with ``DIAG = 2`` (Barlow Twins), else
    ``Σ_i G_ii²``: a loss's off-diagonal and diagonal sums, never formed as a difference.

    ``NEED_GRAD``: ``Γ = mul·G`` off the diagonal; on it 0 (``DIAG = 0``: the spectral matrix
    path's ``offdiag(S)``), ``coef[v, i]`` (1: VICReg's hinge factor ``h``) or ``2 G_ii - 2``
    (2: Barlow Twins); stored in ``gam``'s dtype into ``gam[v]`` ((K, K) contiguous per view,
    views ``gam_views`` elements apart; it may be ``part[v, 0]`` itself: each program reads
    its tile's slices before it writes the tile) and, with ``TRANSPOSE``, ``Γᵀ`` into
    ``gam_t[v]`` (the two products then read operands of one layout).  ``RNE_BF16`` (the
    interpreter, bf16): round to nearest even as the GPU does (:func:`round_bf16_rne`).

    ``PAIR`` (two views, grid axis 2 of size 1: each program does both): ``sq[t] =
    (Σ G_0∘G_1, 0)`` (the spectral Gram path's ``<G1, G2>_F``) and, with ``NEED_GRAD``, each
    ``G_v`` itself (``mul``, ``DIAG``, ``TRANSPOSE`` unused) stored into ``gam[v]``."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    v = tl.program_id(2)
    # masks and the diagonal from 32-bit indices (64-bit compares kept across the slice loop
    # spilled 4 B on sm_90 at K = 1031, bf16), 64-bit offsets
    r32 = pid_i * BLOCK + tl.arange(0, BLOCK)
    c32 = pid_j * BLOCK + tl.arange(0, BLOCK)
    rows = r32.to(tl.int64)
    cols = c32.to(tl.int64)
    mask = (r32 < K)[:, None] & (c32 < K)[None, :]
    idx = rows[:, None] * K + cols[None, :]
    kk = K.to(tl.int64) * K
    acc = _slices_tile(part_ptr + v.to(tl.int64) * SPLIT * kk, idx, mask, SPLIT, kk, scale)
    tile = (v * tl.num_programs(0) + pid_i) * tl.num_programs(1) + pid_j
    if PAIR:
        acc2 = _slices_tile(part_ptr + SPLIT * kk, idx, mask, SPLIT, kk, scale)
        tl.store(sq_ptr + 2 * tile, tl.sum(tl.sum(acc * acc2, axis=1), axis=0))
        tl.store(sq_ptr + 2 * tile + 1, 0.0)
        if NEED_GRAD:
            _store_tile(gam_ptr, idx, acc, mask, RNE_BF16)
            _store_tile(gam_ptr + gam_views, idx, acc2, mask, RNE_BF16)
    else:
        on_diag = r32[:, None] == c32[None, :]
        off = tl.where(on_diag, 0.0, acc)
        if DIAG == 2:
            dd = tl.where(on_diag & mask, (1.0 - acc) * (1.0 - acc), 0.0)
        else:
            dd = tl.where(on_diag, acc * acc, 0.0)
        tl.store(sq_ptr + 2 * tile, tl.sum(tl.sum(off * off, axis=1), axis=0))
        tl.store(sq_ptr + 2 * tile + 1, tl.sum(tl.sum(dd, axis=1), axis=0))
        if NEED_GRAD:
            gam = off * mul
            if DIAG == 1:
                h = tl.load(coef_ptr + v * K + rows, mask=r32 < K, other=0.0)
                gam = tl.where(on_diag, h[:, None], gam)
            elif DIAG == 2:
                gam = tl.where(on_diag, 2.0 * acc - 2.0, gam)
            if RNE_BF16:
                gam = round_bf16_rne(gam)
            val = gam.to(gam_ptr.dtype.element_ty)
            dst = v.to(tl.int64) * gam_views
            tl.store(gam_ptr + dst + idx, val, mask=mask)
            if TRANSPOSE:
                tl.store(gam_t_ptr + dst + cols[None, :] * K + rows[:, None], val, mask=mask)


@triton.jit
def combine_kernel(a_ptr, N_A, A_STRIDE, p_ptr, ROWS, COLS, ROW_STRIDE, out_ptr,
                   wa, wa2, wp, A2: tl.constexpr, BLOCK: tl.constexpr):
    """``out = wa·Σ a + wp·(Σ p + [A2] wa2·Σ a²)`` (one program, fp32 sums in a fixed
    order; the spectral Gram path's ``<G1, G2>_F - Σ d²`` is formed before it is scaled).

    ``a``: N_A fp32 values A_STRIDE apart (the spectral op's ``d``; the ``Σ x∘q`` column of
    rowmat's partials); ``p``: a (ROWS, COLS) fp32 array, rows ROW_STRIDE apart, columns
    contiguous (the pairwise kernel's partials of one column chunk, ``Σ x∘y`` partials).
    ``A2`` is a constexpr, so ``wa2·Σ a²`` is not formed (no ``0·inf``) where it is unused.
    """
    offs = tl.arange(0, BLOCK)
    sa = tl.zeros([BLOCK], dtype=tl.float32)
    sa2 = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, N_A, BLOCK):
        j = i + offs
        v = tl.load(a_ptr + j * A_STRIDE, mask=j < N_A, other=0.0)
        sa += v
        if A2:
            sa2 += v * v
    sp = tl.zeros([BLOCK], dtype=tl.float32)
    n = ROWS * COLS
    for i in range(0, n, BLOCK):
        j = i + offs
        r = j // COLS
        sp += tl.load(p_ptr + r * ROW_STRIDE + (j - r * COLS), mask=j < n, other=0.0)
    p_sum = tl.sum(sp, axis=0)
    if A2:
        p_sum += wa2 * tl.sum(sa2, axis=0)
    tl.store(out_ptr, wa * tl.sum(sa, axis=0) + wp * p_sum)
