"""Triton kernels of MINCLoss's training step around the Gram layer (docs/math.md §2).

The loss itself is the shared Gram layer's ``rowmat`` and the batch moment its ``gram``;
these kernels are the rest of a default ``MINCLoss`` call (feature map ``"l2"``), which
eager PyTorch spends about 35 small ops on:

* :func:`l2_rows_kernel`: ``x̂_i = x_i / (max(‖x_i‖, eps) + 0·‖x_i‖)`` (MINC's ``"l2"``
  map: :func:`minc_kernels.losses.minc.l2_rows`; a NaN row where the fp32 sum of squares
  overflows or the row is not finite), written in the storage dtype, and the fp32
  denominators.
* :func:`l2_rows_backward_kernel`: that map's Jacobian applied in place to a fp32
  gradient, ``g ← (g - x̂ (x̂·g)·[‖x‖ > eps]) / denom`` with ``x̂`` recomputed in fp32 from
  ``x``.
* :func:`moment_ema_kernel`: the moment's EMA step, in place, and the bias-corrected copy
  the loss reads: ``M ← lerp(M, C/n, w)`` unless C is not finite (then M and the update
  count stay, the skip count grows: decided on the device), ``M_c = M / max(1 - β^u, 1-β)``.

Elementwise and row kernels: bandwidth-bound, fp32 arithmetic, int64 offsets.
"""
import triton
import triton.language as tl

from .mio import _round_to


@triton.jit
def l2_rows_kernel(
    x_ptr, out_ptr, denom_ptr, B, K, stride_b, stride_k,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """Rows ``[pid·BR, (pid+1)·BR)``: ``denom`` (fp32) and ``x̂`` (contiguous, ``out``'s dtype,
    rounded to nearest even; ``INTERP_BF16``: see :func:`minc_kernels.kernels.mio._round_to`)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < B
    ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m = r_mask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_b + ks[None, :] * stride_k, mask=m,
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    n = tl.sqrt_rn(ss)
    # + 0·n: a NaN denominator (so a NaN row) where n is inf or NaN, as losses.minc.l2_rows
    denom = tl.maximum(n, EPS) + n * 0.0
    tl.store(denom_ptr + rows, denom, mask=r_mask)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m = r_mask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_b + ks[None, :] * stride_k, mask=m,
                    other=0.0).to(tl.float32)
        y = tl.div_rn(x, denom[:, None])
        tl.store(out_ptr + rows[:, None] * K + ks[None, :],
                 _round_to(y, out_ptr.dtype.element_ty, INTERP_BF16), mask=m)


@triton.jit
def l2_rows_backward_kernel(
    x_ptr, denom_ptr, g_ptr, B, K, stride_b, stride_k,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """In place on the contiguous fp32 ``g`` (the gradient wrt ``x̂``): the gradient wrt ``x``."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < B
    denom = tl.load(denom_ptr + rows, mask=r_mask, other=1.0)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m = r_mask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_b + ks[None, :] * stride_k, mask=m,
                    other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * K + ks[None, :], mask=m, other=0.0)
        dot += tl.sum(tl.div_rn(x, denom[:, None]) * g, axis=1)
    # below eps the denominator is the constant eps: no radial term
    dot = tl.where(denom > EPS, dot, 0.0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m = r_mask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_b + ks[None, :] * stride_k, mask=m,
                    other=0.0).to(tl.float32)
        g_ptrs = g_ptr + rows[:, None] * K + ks[None, :]
        g = tl.load(g_ptrs, mask=m, other=0.0)
        out = tl.div_rn(g - tl.div_rn(x, denom[:, None]) * dot[:, None], denom[:, None])
        tl.store(g_ptrs, out, mask=m)


@triton.jit
def moment_ema_kernel(
    c_ptr, m_ptr, out_ptr, nu_ptr, sk_ptr, new_nu_ptr, N, SPLIT, rows, weight, log_beta, floor,
    UPDATE: tl.constexpr, CHECK: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of the flat k×k moment.  ``C`` = the sum of the SPLIT (k×k) partials at
    ``c_ptr``, ``N`` elements apart (the Gram's row slices, of one target or two), added in
    order 0, 1, ... (where a torch sum, and an add per further target, did it).  ``nu``/``sk``:
    the int64 update and skip counts before the step.  Program 0 updates ``sk`` in place (no other program reads it) and
    writes the new update count to ``new_nu`` (every program reads the old one, so it cannot
    be updated in place here).

    ``CHECK``: C counts as finite iff ``C[0, 0]`` is: C is the moment of l2-mapped rows, whose
    entries are at most 1 in magnitude unless the whole row is NaN, and a NaN row makes every
    diagonal entry NaN (the caller guarantees the map; other maps take the torch path)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    n_upd = tl.load(nu_ptr)
    if UPDATE:
        ok = n_upd >= 0  # True
        c = tl.load(c_ptr + offs, mask=mask, other=0.0)
        for s in range(1, SPLIT):
            c += tl.load(c_ptr + s * N + offs, mask=mask, other=0.0)
        if CHECK:
            c00 = tl.load(c_ptr)
            for s in range(1, SPLIT):
                c00 += tl.load(c_ptr + s * N)
            ok = (c00 * 0.0) == 0.0  # False for NaN and ±inf
        # C / rows rounded as torch's div_, then torch.lerp's formula (exact at weight 1)
        c = tl.div_rn(c, tl.full((BLOCK,), 1.0, tl.float32) * rows)
        if weight < 0.5:
            new = m + weight * (c - m)
        else:
            new = c - (c - m) * (1.0 - weight)
        new = tl.where(ok, new, m)
        tl.store(m_ptr + offs, new, mask=mask)
        n_upd = n_upd + ok.to(tl.int64)
        if pid == 0:
            tl.store(new_nu_ptr, n_upd)
            tl.store(sk_ptr, tl.load(sk_ptr) + 1 - ok.to(tl.int64))
        m = new
    if BIAS:
        # 1 - β^u in fp64 (for β near 1), floored at its first-step value 1 - β (u = 0, never
        # updated: M = 0, and 0 instead of 0/0)
        corr = 1.0 - tl.exp(n_upd.to(tl.float64) * log_beta)
        corr = tl.maximum(corr, floor).to(tl.float32)
        tl.store(out_ptr + offs, tl.div_rn(m, tl.full((BLOCK,), 1.0, tl.float32) * corr),
                 mask=mask)
