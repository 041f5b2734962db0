"""Every tile configuration of the Triton launchers, in one place.

Each function maps a shape class (and dtype) to the constexpr tile sizes, ``num_warps`` and
``num_stages`` of one kernel.  No autotuning: the configuration depends only on the shape
and dtype, so the same input gives the same bits on any GPU.  ``for_device=True`` gives the
GPU tiles even under the CPU interpreter (the cost model must not depend on where it runs).
Every function returns a :class:`KernelConfig`.
The sm_90 facts quoted in the comments come from the static suite
(``python -m benchmarks.static_sm90``, table in ``benchmarks/results/static-sm90/``).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import torch

from ._common import TARGET_PROGRAMS, TARGET_SMS, cdiv, interpreting, is_fp32, next_pow2

__all__ = ["KernelConfig", "rowmat_config", "rowmat_presplit", "gram_config", "pairwise_config",
           "pairwise_split", "rows_config", "pick_config", "colstats_config", "cross_gram_config"]


class KernelConfig(Mapping):
    """A launch configuration: a read-only, hashable mapping of a kernel's meta-parameters,
    named exactly as the kernel and Triton name them (``BLOCK_M``, ..., ``num_warps``,
    ``num_stages``), so ``kernel[grid](..., **cfg)`` and ``cfg["BLOCK_M"]`` work.

    Values are ints (or bools).  Nothing changes one in place: :meth:`replace` returns a new
    configuration with some values changed.  A configuration that also carries launcher
    decisions (MIO's :func:`pick_config`: lower-case keys such as ``n_splits``) is not
    splatted: its launcher passes each kernel its own keys.
    """

    __slots__ = ("_params",)

    def __init__(self, **params: int) -> None:
        for key, value in params.items():
            if not isinstance(value, int):  # bool is an int
                raise TypeError(f"KernelConfig: {key} must be an int or a bool, got "
                                f"{type(value).__name__} {value!r}")
        object.__setattr__(self, "_params", params)

    def __getitem__(self, key: str) -> int:
        try:
            return self._params[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a parameter of this kernel configuration "
                           f"(it has {', '.join(self._params)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __hash__(self) -> int:
        return hash(frozenset(self._params.items()))

    def __repr__(self) -> str:
        return f"KernelConfig({', '.join(f'{k}={v!r}' for k, v in self._params.items())})"

    def __setattr__(self, name, value):
        raise AttributeError(f"KernelConfig is read-only (setting {name!r}): use replace()")

    def __delattr__(self, name):
        raise AttributeError(f"KernelConfig is read-only (deleting {name!r})")

    def __reduce__(self):
        return _kernel_config, (dict(self._params),)

    def replace(self, **changes: int) -> KernelConfig:
        """A new configuration with ``changes`` applied; each must name an existing key."""
        unknown = [key for key in changes if key not in self._params]
        if unknown:
            raise TypeError(f"KernelConfig.replace: no parameter {', '.join(map(repr, unknown))} "
                            f"to replace (it has {', '.join(self._params)})")
        return KernelConfig(**{**self._params, **changes})


def _kernel_config(params: dict) -> KernelConfig:  # for pickle / copy
    return KernelConfig(**params)


# A configuration depends only on its arguments (and on the interpreter flag, fixed at
# import); launchers ask for one on every call, and a small call's time is host time:
# cached (issue 21; benchmarks/results/cpu-host-overhead-2026-12-06b/).
_cached = functools.lru_cache(maxsize=4096)

_ONE_WAVE = TARGET_SMS
_TARGET_PROGRAMS = TARGET_PROGRAMS  # about two waves of an H100; a shape constant, so tiles (and with
# them the bits) depend only on the shape, not on the GPU


# ----------------------------------------------------------------------------- Gram layer
@_cached
def rowmat_config(k: int, dtype: torch.dtype = torch.float32, gha: bool = False,
                  for_device: bool = False, b: int | None = None,
                  wide: bool = False) -> KernelConfig:
    """:func:`~minc_kernels.kernels.gram.rowmat_kernel` (``X Gᵀ`` fused), grid
    (B/BLOCK_M) × (k/BLOCK_N).

    64×64 output tiles, 8 warps (with 4, the GHA variant's two accumulators spill on sm_90).
    Small B·k (B = 256 with k <= 2048, B = 1024 with k = 512 gave 64-128 programs): the row
    tile halves (down to 16 rows) until one wave of 132 SMs runs.
    fp32 GHA (strict ``ieee`` FMA dots, two accumulators, three pipelined loops): a 16-wide
    k chunk, 184 registers where 32 needs 255; and when the rows are not 16-element aligned
    (no vector / async copies: the loads go through registers) no software pipelining,
    196 registers where 3 stages need 255 and spill.

    ``wide`` (a candidate for a half ``G`` rounded by the caller, MODE 4, chosen only by a
    measured table: ``MINC_KERNELS_GRAM=triton_wide``): 64×128 tiles with a 64-wide k chunk
    and one warpgroup, where both the row count and the row length are multiples of 16
    (else the default tiles).  On sm_90 the default 64×64 tiles issue ``wgmma m64n32k16``
    (8 warps: two warpgroups of 32 columns) and move 8 KB per 262 kFLOP through L2
    (32 flop/B: about 320 TFLOP/s at ~10 TB/s of L2); wide tiles issue ``m64n128k16`` and
    move 24 KB per 1 MFLOP (43 flop/B), 244 registers, no spill, 72 KB of shared memory,
    2 CTAs per SM (B = k = 8192).  Unaligned rows spilled 464-976 B with them (k = 1001,
    130, 257), an odd row count 16 B at 255 registers (B = 1023, 1031: the masked
    epilogue).  A prediction until a GPU measures both (issue 21).
    """
    if interpreting() and not for_device:
        if wide:  # another tiling under the interpreter too (tests: any tiling, one result)
            return KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
        return KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4)
    kk = max(16, next_pow2(k))
    if wide and not gha and k % 16 == 0 and (b is None or b % 16 == 0):
        return KernelConfig(BLOCK_M=64, BLOCK_N=min(128, kk), BLOCK_K=min(64, kk), num_warps=4,
                            num_stages=3)
    cfg = KernelConfig(BLOCK_M=64, BLOCK_N=min(64, kk), BLOCK_K=min(32, kk), num_warps=8,
                       num_stages=3)
    if b is not None:
        n_n = cdiv(k, cfg["BLOCK_N"])
        # below one wave only: smaller row tiles lose the m64 wgmma shape
        while cdiv(b, cfg["BLOCK_M"]) * n_n < _ONE_WAVE and cfg["BLOCK_M"] > 16:
            cfg = cfg.replace(BLOCK_M=cfg["BLOCK_M"] // 2)
    if gha and is_fp32(dtype):
        cfg = cfg.replace(BLOCK_K=16, num_stages=3 if k % 16 == 0 else 1)
    return cfg


# The Gram kernels' tile order (kernels.gram.grouped_tile): programs by groups of this many
# row blocks (rowmat) or column blocks (moment_partial, cross_gram), so the ~264 programs in
# flight read ~16 blocks of one operand and ~16 of the other, not all of one.  16 from
# benchmarks/tile_order.py (an L2 model, not a measurement): at k = 8192 it predicts bf16
# rowmat's operand traffic from HBM 3.7× smaller than in launch order at B = 4096 and 7×
# at B = 8192 (8080 -> 1152 MiB: about 2.5 ms -> 0.36 ms at 3.35 TB/s, against a 1.5 ms
# flop floor); at B = 2048 (X fits in L2) 1.8× larger, both far under the flop floor.  32
# is a little better in the model but at the edge of a cliff once the footprint outgrows
# L2.  The order changes no value.  Half rows only (ops.gram.tile_group: fp32 rows are
# FMA-bound).  Under the interpreter 2, so that small test shapes take it.
TILE_GROUP = 16
TILE_GROUP_INTERPRETER = 2
# ... and only where what the programs in flight read in the grid's own order (all of X for
# rowmat, the row slice's columns for the moment kernels) exceeds half the 50 MB L2: below
# that both orders read each block once in the model (k <= 2048 at B <= 4096), and the
# map's integers only move registers.
TILE_GROUP_MIN_BYTES = 25 << 20


# rowmat's bf16 path (a fp32 G against bf16 rows as three bf16 dots) splits G into its bf16
# pieces once, in a pass of its own, instead of in every program's loop (kernels/gram.py,
# MODE 3), from this many rows and columns.  The pass moves 10 bytes per element of G; the
# product does 6·B flops per element, so the pass costs about 330/B of the product's time
# (H100 bf16: 600 TFLOP/s against 3 TB/s): 16 % at B = 2048.  Smaller calls are bound by
# launches, and the pass is one more.  The pieces take 6k² bytes beside G while the product
# runs (384 MiB at k = 8192): above ROWMAT_PRESPLIT_MAX_BYTES the loop forms them (MODE 1)
# rather than add that much memory.  A guess until a GPU measures both (issue 21):
# MINC_KERNELS_ROWMAT_SPLIT=always|never overrides it.
ROWMAT_PRESPLIT_MIN_ROWS = 2048
ROWMAT_PRESPLIT_MIN_COLS = 256
ROWMAT_PRESPLIT_MAX_BYTES = 128 << 20  # k up to 4729
SPLIT_BLOCK = 1024  # elements per program of split_bf16x3_kernel
COMBINE_BLOCK = 256  # lanes of the one-program combine_kernel (a loss from partials)
# gram_finish_kernel: 32×32 tiles, 8 warps.  Compiled for sm_90 by the static suite (as the
# spectral matrix path's offdiag pass, which it generalises): with 4 warps, 64×64 tiles took
# up to 252 registers on sm_90 at B = 1023 (fp32, unaligned rows: masked, unvectorised loads
# and the transposed store's layout conversion) and 32×32 tiles spilled 4 B (bf16/fp16,
# B = 1023 and 1031); 32×32 with 8 warps: at most 32 registers, no spill.
FINISH_BLOCK = 32
FINISH_WARPS = 8


def rowmat_presplit(b: int, k: int) -> bool:
    """Whether a bf16 ``rowmat`` of (b, k) rows splits its fp32 ``G`` beforehand."""
    return (b >= ROWMAT_PRESPLIT_MIN_ROWS and k >= ROWMAT_PRESPLIT_MIN_COLS
            and 6 * k * k <= ROWMAT_PRESPLIT_MAX_BYTES)


@_cached
def gram_config(k: int, dtype: torch.dtype, for_device: bool = False) -> KernelConfig:
    """:func:`~minc_kernels.kernels.gram.moment_partial_kernel` (``Xᵀ X`` by row slices)."""
    if interpreting() and not for_device:
        return KernelConfig(BLOCK_K=16, BLOCK_B=16, num_warps=4)
    # Half inputs: 64-row chunks, except when the rows are not 16-element aligned: the
    # masked loads then go through registers and 64 rows need 253-255 of them (sm_90); 32: 166.
    half_rows = 64 if k % 16 == 0 else 32
    return KernelConfig(BLOCK_K=min(64, max(16, next_pow2(k))),
                        BLOCK_B=32 if is_fp32(dtype) else half_rows, num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------- spectral
PAIRWISE_TARGET_PROGRAMS = _TARGET_PROGRAMS
PAIRWISE_MAX_SPLITS_GRAD = 16  # each split holds a (B, k) fp32 partial of the gradient


@_cached
def pairwise_config(b: int, k: int, dtype: torch.dtype, for_device: bool = False
                    ) -> KernelConfig:
    """:func:`~minc_kernels.kernels.spectral.pairwise_offdiag_kernel`, by shape class.

    The grid is (row blocks) × (column-stream splits) without a gradient, so small B needs
    small S tiles to fill 132 SMs: B <= 256: 16×16 tiles, 2 warps (16 × 16 = 256 programs at
    B = 256, where 64×64 tiles gave 4 × 4); B <= 512: 32×32, 4 warps (256 programs at
    B = 512).  Larger B: 64×64 tiles, 8 warps (4 warps spill on sm_90: S tile + output chunk
    accumulators).  Half inputs take a 64-wide k chunk, fp32 (strict ``ieee`` FMA dots) 32.
    """
    if interpreting() and not for_device:
        return KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_C=16, num_warps=4)
    kk = max(16, next_pow2(k))
    # Rows not 16-element aligned (k % 16): no vector/async copies, the masked loads go
    # through registers: fp32 then spills 8-16 B with 2-3 stages (none with 1), and half
    # with the gradient needs 255 registers with a 64-wide k chunk (202 with 16).
    aligned = k % 16 == 0
    f32_stages = None if aligned else 1
    if b <= 256:
        return KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=min(32 if is_fp32(dtype) else 64, kk),
                            BLOCK_C=min(64, kk), num_warps=2,
                            num_stages=(f32_stages or 3) if is_fp32(dtype) else 3)
    if b <= 512:
        return KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=min(32 if is_fp32(dtype) else 64, kk),
                            BLOCK_C=min(64, kk), num_warps=4,
                            num_stages=(f32_stages or 3) if is_fp32(dtype) else 3)
    if is_fp32(dtype):
        return KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(32, kk), BLOCK_C=min(64, kk),
                            num_warps=8, num_stages=f32_stages or 2)
    return KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(64 if aligned else 16, kk),
                        BLOCK_C=min(128, kk), num_warps=8, num_stages=3)


@_cached
def pairwise_split(b: int, k: int, need_grad: bool, cfg: KernelConfig) -> tuple[int, int]:
    """``(splits, column blocks per split)`` of the pairwise kernel's column stream.

    Row blocks × output-column chunks alone give (B/64)·1 programs without a gradient (16 at
    B = 1024): the column stream is split until about ``PAIRWISE_TARGET_PROGRAMS`` programs
    run, each writing its own fp32 partials (summed in a fixed order: no atomics).  With the
    gradient the launch runs both views' programs (two per split).
    """
    n_m = cdiv(b, cfg["BLOCK_M"])
    n_c = cdiv(k, cfg["BLOCK_C"]) if need_grad else 1
    n_cb = cdiv(b, cfg["BLOCK_N"])
    views = 2 if need_grad else 1
    split = min(n_cb, max(1, cdiv(PAIRWISE_TARGET_PROGRAMS, n_m * n_c * views)))
    if need_grad:
        split = min(split, PAIRWISE_MAX_SPLITS_GRAD)
    per = cdiv(n_cb, split)
    return cdiv(n_cb, per), per


@_cached
def rows_config(k: int) -> KernelConfig:
    """The spectral row kernels (clipping, its Jacobian)."""
    if interpreting():
        return KernelConfig(BLOCK_R=16, BLOCK_K=min(64, max(16, next_pow2(k))), num_warps=4)
    # 8 warps: 4 spill (sm_90)
    return KernelConfig(BLOCK_R=8, BLOCK_K=min(512, max(16, next_pow2(k))), num_warps=8)


@_cached
def l2_rows_config(b: int, k: int) -> KernelConfig:
    """MINC's l2 row map and its Jacobian (kernels/minc.py): 8 rows per program as the
    spectral row kernels, fewer where that would leave SMs idle (B = 512 would run 64
    programs): rows per program the power of two under B / TARGET_PROGRAMS, 1 to 8."""
    if interpreting():
        return KernelConfig(BLOCK_R=16, BLOCK_K=min(64, max(16, next_pow2(k))), num_warps=4)
    per = max(1, min(8, next_pow2(max(1, b // TARGET_PROGRAMS) + 1) // 2))
    return KernelConfig(BLOCK_R=per, BLOCK_K=min(512, max(16, next_pow2(k))), num_warps=4)


#: Elements of the flat k×k moment per program of MINC's EMA kernel (bandwidth-bound).
MOMENT_EMA_BLOCK = 2048


# ----------------------------------------------------------------------------- MIO
_MIO_TARGET_PROGRAMS = 256  # ~TARGET_PROGRAMS rounded to a power of two (MIO's tiles are powers of two)
_MIO_MAX_SPLITS = 16
MIO_REG_MAX_K = 256  # largest padded k whose row tile and gradient accumulator live in registers


_MIO_ROWS_BLOCK_R = 16  # rows per program of the row kernels (normalize, gradient finalize)
_MIO_ROWS_BLOCK_K = 128  # their k chunk
# mio_grad_finalize's warps: its 16×128 chunk holds four fp32 tiles (ẑ and g of both views);
# with 4 warps it compiled at 168-255 registers on sm_90 (255 at k = 130 in every dtype, 16 B
# spilled in bf16 at B = 1031); with 8, 103-168 and no spill (static suite, triton 3.8)
_MIO_FINALIZE_NUM_WARPS = 8


def _mio_config(bm: int, bn: int, bk: int, acc_in_regs: bool, nw: int, ns: int, n_splits: int,
                strip_rows: int) -> KernelConfig:
    return KernelConfig(
        # the negative-tile kernels' own (mio_negative_tiles; the strip kernels take all but
        # ACC_IN_REGS); BLOCK_K: padded k (register path) or the k chunk (streamed, strip)
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACC_IN_REGS=acc_in_regs, num_warps=nw, num_stages=ns,
        # the row kernels' BLOCK_R and BLOCK_K (mio_normalize_rows, mio_grad_finalize)
        ROWS_BLOCK_R=_MIO_ROWS_BLOCK_R, ROWS_BLOCK_K=_MIO_ROWS_BLOCK_K,
        FINALIZE_NUM_WARPS=_MIO_FINALIZE_NUM_WARPS,
        # launcher only: column-range splits of the one-pass path; strip_rows > 0: the large-k
        # "strip" path, rows of S per group (see mio_forward)
        n_splits=n_splits, strip_rows=strip_rows)


def _mio_strip_cap(k: int, bk: int) -> int:
    """Rows of one σ strip at most (the strip path's O(B·k) buffer): max(2048, 2k), k padded
    to the k chunk."""
    return max(2048, 2 * cdiv(k, bk) * bk)


def pick_config(b: int, k: int, dtype: torch.dtype, on_gpu: bool = True,
                block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None, n_splits: int | None = None,
                strip_rows: int | None = None) -> KernelConfig:
    """MIO tile sizes by shape and dtype: one :class:`KernelConfig` for all of MIO's launches
    (keys: see :func:`_mio_config`; the launcher passes each kernel its own).

    Paths: k <= 256 (padded): "registers" (row tile and gradient accumulator in registers,
    one pass); larger k: "strip" (S tiles over k chunks -> a strip of σ(S/τn) of
    ``strip_rows`` rows -> a GEMM with Ẑ), or "streamed" (accumulator in memory; only
    when ``block_k < k`` is forced with ``strip_rows=0``).
    Overrides exist for tests (multi-block, splits, every path at small shapes).
    """
    n = 2 * b
    kp = max(16, next_pow2(k))
    half = dtype != torch.float32
    default_strip = strip_rows is None and block_k is None and kp > MIO_REG_MAX_K
    if default_strip or strip_rows:
        # Half: 128×64, not 128×128: the σ/softplus epilogue of a 128×128 fp32 tile needs
        # 255 registers and spills 92 B on sm_90 (fp16 with gradient); 128×64 needs ~156.
        bm, bn, bk, nw, ns = (128, 64, 64, 8, 3) if half else (64, 64, 32, 8, 2)
        if on_gpu and block_m is None and block_n is None:
            # Small N (B <= 512): shrink the S tiles until about two waves of programs run
            # (64 programs at B = 256 with 64×64 tiles; 256 with 32×32), and the
            # strip @ Ẑ GEMM, which uses the same tiles, fills with them.
            while cdiv(n, bm) * cdiv(n, bn) < _MIO_TARGET_PROGRAMS and max(bm, bn) > 32:
                if bm >= bn:
                    bm //= 2
                else:
                    bn //= 2
            # The strip @ Ẑ GEMM's grid is (strip rows / bm) × (k / bn): at k = 512 that was
            # 16 × 8 programs; narrower column tiles fill it.  Strip rows: the smallest of
            # the even strips that ops.mio._negatives_by_strips makes.
            n_blocks = cdiv(n, bm)
            rows_est = n_blocks // cdiv(n_blocks, _mio_strip_cap(k, bk) // bm) * bm
            while cdiv(rows_est, bm) * cdiv(k, bn) < _MIO_TARGET_PROGRAMS and bn > 32:
                bn //= 2
            if bm * bn <= 32 * 64:
                nw = 4  # 8 warps would own a few rows each of a 32-row tile
        if not on_gpu:
            bm, bn, bk = 32, 32, 32
        bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
        if strip_rows is None:
            strip_rows = _mio_strip_cap(k, bk)
        strip_rows = min(cdiv(strip_rows, bm) * bm, cdiv(n, bm) * bm)
        return _mio_config(bm, bn, bk, False, nw, ns, 1, strip_rows)
    if block_k is not None:
        acc_in_regs = block_k >= k
        bk = block_k
    else:
        acc_in_regs = kp <= MIO_REG_MAX_K
        bk = kp if acc_in_regs else (64 if half else 32)
    if acc_in_regs:
        if half:
            # 64 rows, not 128: with the gradient, a 128×128 fp32 accumulator plus the row
            # tile needs 255 registers on sm_90 (fp16, k = 128); 64 rows need ~170, and
            # small B gets twice the row blocks.
            bm, bn, nw, ns = (64, 64, 8, 3) if kp <= 128 else (64, 64, 8, 2)
        else:
            # 32 rows: with 64, the fp32 gradient accumulator spills 16-64 B on sm_90 when
            # 2B is not a multiple of 16 (masked rows); 32 rows need 64-87 registers.
            bm, bn, nw, ns = 32, 32, 8, 2
    else:
        bm, bn, nw, ns = (64, 128, 8, 2) if half else (64, 64, 8, 2)
    if not on_gpu:
        # Interpreter: numpy per program; moderate tiles keep padding waste small on tiny shapes.
        bm, bn = min(bm, 32), min(bn, 32)
    bm = block_m or bm
    bn = block_n or bn
    n_row_blocks = cdiv(n, bm)
    n_col_blocks = cdiv(n, bn)
    if n_splits is None:
        n_splits = 1 if not on_gpu else max(1, min(_MIO_MAX_SPLITS, _MIO_TARGET_PROGRAMS // n_row_blocks))
    n_splits = max(1, min(n_splits, n_col_blocks))
    # no empty split: recompute from the number of column blocks per split
    n_splits = cdiv(n_col_blocks, cdiv(n_col_blocks, n_splits))
    return _mio_config(bm, bn, bk, acc_in_regs, nw, ns, n_splits, 0)


# ----------------------------------------------------------------------------- Barlow Twins / VICReg
@_cached
def colstats_config(k: int, for_device: bool = False) -> KernelConfig:
    """:func:`~minc_kernels.kernels.gram.colstats_kernel` and its backward: one program per
    ``BLOCK_K`` columns streams its rows: the column block narrows (64 -> 32 -> 16,
    2048-element tiles) until a wave of 132 SMs runs; below k = 2097 the launcher splits the
    rows into slices as well (``ops.gram._colstats_split``: a first launch of per-slice
    partials, merged by the second), where the launch is large enough to be worth it.
    8 warps: with 4, the kernels
    took 120-188 registers on sm_90 and spilled 4-8 B at k = 1001 (fp32 32×64, bf16
    128×16 tiles); with 8, 64-108 registers and no spill (static compile, no GPU run).
    """
    if interpreting() and not for_device:
        return KernelConfig(BLOCK_B=16, BLOCK_K=16, num_warps=4)
    kk = max(16, next_pow2(k))
    bk = min(64, kk)
    while bk > 16 and cdiv(k, bk) < TARGET_SMS:
        bk //= 2
    return KernelConfig(BLOCK_B=2048 // bk, BLOCK_K=bk, num_warps=8)


@_cached
def cross_gram_config(k: int, dtype: torch.dtype, for_device: bool = False) -> KernelConfig:
    """:func:`~minc_kernels.kernels.gram.cross_gram_kernel` (``Xᵀ Y``): the tiles of
    :func:`gram_config`, except fp32 with rows not 16-element aligned: two operands loaded
    through registers spill 12/8 B with 32-row chunks on sm_90 (k = 1001); 16 rows: none."""
    cfg = gram_config(k, dtype, for_device)
    if is_fp32(dtype) and k % 16 and (for_device or not interpreting()):
        cfg = cfg.replace(BLOCK_B=16)
    return cfg
