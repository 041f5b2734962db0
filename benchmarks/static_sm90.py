"""Static sm_90 suite: every Triton launch of the ops, compiled for Hopper without a GPU.

    python -m benchmarks.static_sm90 --out benchmarks/results/static-sm90/   # full grid
    python -m benchmarks.static_sm90 --subset ci --json-only OUT              # what CI checks

How: the ops' real launchers (``minc_kernels.ops.*.*_forward``, the plain bodies of the
custom ops) run on ``device="meta"`` tensors with Triton's active driver replaced by a stub
whose target is ``GPUTarget("cuda", 90, 32)``, and ``JITFunction.run`` wrapped so every
launch compiles (``warmup=True``) instead of running.  So each kernel gets exactly the
specialisation a real launch gets (Triton's own binder: constexprs, ints equal to 1 or
divisible by 16, pointer alignment from ``data_ptr()``, which meta tensors give as their
byte offset), the tile configuration the launcher picks for that shape, and the grid it
asks for.  ``ptxas -v`` (Triton's own run, its log captured) gives registers, spills and
stack; Triton's metadata the dynamic shared memory; the PTX whether fp32 variants stay off
tf32/mma and whether the loads are pipelined (``cp.async``) and dots use ``wgmma``.

The losses are those of ``minc_kernels.losses.REGISTRY`` whose op has a meta-tensor launcher
in :data:`LAUNCHERS` (the registry's variants included, plus the suite's own: Barlow Twins'
distributed cross-correlation op); a registered loss with kernels but no launcher there is
listed as uncovered in the results' meta and printed.  The Gram-layer launchers run as
``MINC_KERNELS_GRAM=triton`` (the kernels, not the cuBLAS candidate).

Per launch, the table gives the grid, the resident CTAs per SM (registers, shared memory
and threads of sm_90), waves over 132 SMs, the SM fill of the first wave, the launch's ideal
time (useful flops at peak; the column-statistics kernels: bytes at the copy bandwidth),
and for spectral, Barlow Twins and VICReg the cost model's estimate
(``ops.spectral.estimate_seconds``) of the algorithm it launched.
:func:`violations` is what ``tests/test_static_sm90.py`` asserts.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # Compiling for sm_90 needs the real JIT, not the interpreter: before triton is imported.
    # (Imported as a module, e.g. by a test for `violations`, it leaves the environment be.)
    os.environ.pop("TRITON_INTERPRET", None)
    # the Gram layer's Triton kernels (MINC_KERNELS_GRAM=cublas would launch none of them)
    os.environ["MINC_KERNELS_GRAM"] = "triton"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# sm_90 (H100 SXM) limits used for occupancy: per SM 64K registers, 228 KB shared memory
# (227 KB usable by one CTA, 1 KB reserved per CTA), 2048 threads, 32 CTAs.
SMS = 132
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA_MAX = 227 * 1024
SMEM_RESERVED_PER_CTA = 1024
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
REG_LIMIT = 255

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Launches whose work grows with B·k or B²·k: the ones grid fill matters for.  The row
# kernels (one pass over B·k elements, a grid over the rows), mio_loss_combine and
# combine_kernel (one program by design) are light.  The column-statistics kernels of
# Barlow Twins / VICReg are one pass over B·k elements too, but their grid is over the
# columns only (k/BLOCK_K programs stream its rows, split into slices where the columns
# alone leave SMs idle): their fill is checked, against their bytes (MEMORY_BOUND); so is
# the first stage of a row split.
# MINCLoss's step kernels (l2 map, its Jacobian, the moment's EMA) are checked the same way,
# and so are the k×k (B×B) passes: G's bf16 split, the Grams' finishing pass (gram_finish).
MEMORY_BOUND = {"colstats_kernel", "colstats_backward_kernel", "colstats_partial_kernel",
                "colstats_backward_partial_kernel", "l2_rows_kernel", "l2_rows_backward_kernel",
                "moment_ema_kernel", "split_bf16x3_kernel", "gram_finish_kernel"}
HEAVY = {"pairwise_offdiag_kernel", "rowmat_kernel", "moment_partial_kernel",
         "cross_gram_kernel", "mio_negative_tiles", "mio_negative_strip",
         "mio_strip_matmul"} | MEMORY_BOUND
# Kernels of the shared Gram layer: their work is priced on the launch's own (B, K)
# arguments, which differ from the case's (B, k) where a loss multiplies transposed views
# (Barlow Twins / VICReg "pairwise": N×N Grams of the (k, N) views).
GRAM_LAYER = {"rowmat_kernel", "moment_partial_kernel", "cross_gram_kernel"} | MEMORY_BOUND
# The sizes users run (GPU.md): B 256-8192, k 128-8192; grid fill is asserted there.
BENCH_B = (256, 8192)
BENCH_K = (128, 8192)
# A launch whose useful flops take under this long at the device's peak over all 132 SMs is
# bound by launch latency (~4-5 us on H100), not by its grid: fill is not asserted for it.
LATENCY_BOUND_US = 5.0
PEAK_FLOPS = {"fp32": 5.0e13, "half": 8.0e14, "half_x_f32": 2.5e14}  # rough H100, as ops/_common
BYTES_PER_S = 3.0e12  # rough H100 memory bandwidth, as ops/_common.DEVICE_BW


def useful_work(kernel: str, b: int, k: int, grad: bool, dtype: str, grid, tiles, flags,
                dims=None) -> tuple:
    """(work, rate) of what a launch must do at least (recomputation not counted): flops
    and the peak flop/s, or for MEMORY_BOUND kernels bytes and BYTES_PER_S.  ``dims``: the
    launch's own ``(B, K)`` arguments (GRAM_LAYER kernels are priced on them)."""
    half = dtype != "fp32"
    same = PEAK_FLOPS["half" if half else "fp32"]
    n = 2 * b
    if kernel in GRAM_LAYER and dims is not None:
        b, k = dims
    if kernel == "colstats_kernel":
        # read both views, write both centred/standardised copies (storage dtype)
        return 4.0 * b * k * (2 if half else 4), BYTES_PER_S
    if kernel == "colstats_partial_kernel":
        return 2.0 * b * k * (2 if half else 4), BYTES_PER_S  # read both views
    if kernel == "colstats_backward_partial_kernel":
        # read both fp32 gradients, and the standardised copies (STANDARDIZE)
        return 1.0 * b * k * (8 + 2 * (2 if half else 4) * bool(flags.get("STANDARDIZE"))), \
            BYTES_PER_S
    if kernel == "colstats_backward_kernel":
        # read both fp32 gradients, write both fp32 results; the standardised copies
        # (STANDARDIZE) and the inputs (INVARIANCE) in the storage dtype
        per = 16 + 2 * (2 if half else 4) * (bool(flags.get("STANDARDIZE"))
                                              + bool(flags.get("INVARIANCE")))
        return 1.0 * b * k * per, BYTES_PER_S
    isz = 2 if half else 4
    if kernel == "l2_rows_kernel":
        return 2.0 * b * k * isz, BYTES_PER_S  # read the rows, write the mapped rows
    if kernel == "l2_rows_backward_kernel":
        return 1.0 * b * k * (isz + 8), BYTES_PER_S  # read x, read and write the fp32 gradient
    if kernel == "split_bf16x3_kernel":
        return 10.0 * k * k, BYTES_PER_S  # read fp32 G, write its three bf16 pieces
    if kernel == "gram_finish_kernel":
        # per view: read fp32 G (a slice at least); with the gradient write Γ (fp32 in place)
        # or Γ and Γᵀ in the storage dtype (TRANSPOSE: the spectral matrix path's S', S'ᵀ)
        out = (2 * isz if flags.get("TRANSPOSE") else 4) if flags.get("NEED_GRAD") else 0
        return (4.0 + out) * k * k * grid[2], BYTES_PER_S
    if kernel == "moment_ema_kernel":
        # C and M read, M and the corrected copy written (fp32 k×k; fewer in eval)
        return 4.0 * 4 * k * k, BYTES_PER_S
    views = flags.get("VIEWS", 1)  # Gram-layer launches over two views at once
    if kernel == "pairwise_offdiag_kernel":
        # with the gradient one launch does both views: S and offdiag(S) Y for each
        return 2.0 * b * b * k * (4 if flags.get("NEED_GRAD") else 1), same
    if kernel == "rowmat_kernel":
        # MODE 4: a G already in the half dtype, one native dot (the spectral matrix path)
        rate = "fp32" if not half else "half" if flags.get("MODE") == 4 else "half_x_f32"
        return 2.0 * b * k * k * views, PEAK_FLOPS[rate]
    if kernel == "moment_partial_kernel":
        return 1.0 * b * k * k * views, same  # symmetric: half of 2·B·k² per view
    if kernel == "cross_gram_kernel":
        return 2.0 * b * k * k, same  # XᵀY: not symmetric
    if kernel == "mio_negative_tiles":
        return 2.0 * n * n * k * (2 if flags.get("COMPUTE_GRAD") else 1), same
    if kernel in ("mio_negative_strip", "mio_strip_matmul"):
        rows = min(grid[0] * tiles.get("BLOCK_M", 1), n)
        return 2.0 * rows * n * k, same
    return 0.0, same


# ----------------------------------------------------------------------------- compile hook
class _Sm90Driver:
    """Just enough of a Triton driver for ``JITFunction.run(..., warmup=True)``: the target
    is sm_90, device 0, stream 0.  Nothing is ever launched."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


@dataclass
class Launch:
    kernel: str
    grid: tuple
    constexprs: dict
    compiled: object
    ptxas_log: str
    dims: tuple | None = None  # the kernel's own (B, K) arguments, where it has both (split: K)
    call: tuple = ()  # (JITFunction, args, kwargs, grid): the launch as made, to replay it


@contextlib.contextmanager
def sm90_driver():
    """Inside: Triton's active driver is :class:`_Sm90Driver` (compile for sm_90, no GPU)."""
    prev_active = _driver._active
    _driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        _driver._active = prev_active


@contextlib.contextmanager
def compile_launches_for_sm90():
    """Inside: every ``kernel[grid](...)`` compiles for sm_90 and is recorded, not run."""
    records: list[Launch] = []
    orig_run = JITFunction.run
    prev_dump = triton.knobs.nvidia.dump_ptxas_log

    def run(self, *args, grid, warmup, **kwargs):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):  # ptxas -v log, printed by Triton's make_cubin
            compiled = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        consts = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        bound = dict(zip(self.arg_names, args))
        dims = ((int(bound["B"]), int(bound["K"])) if "B" in bound and "K" in bound
                else (0, int(bound["K"]))
                if self.fn.__name__ in ("split_bf16x3_kernel", "gram_finish_kernel") else None)
        records.append(Launch(self.fn.__name__, g, consts, compiled, buf.getvalue(), dims,
                              (self, args, kwargs, grid)))
        return compiled

    triton.knobs.nvidia.dump_ptxas_log = True
    JITFunction.run = run
    try:
        with sm90_driver():
            yield records
    finally:
        JITFunction.run = orig_run
        triton.knobs.nvidia.dump_ptxas_log = prev_dump


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}
_ANALYSIS: dict[int, dict] = {}


def ptxas_tool():
    """Triton's bundled ptxas (``get_ptxas`` takes an arch argument in newer triton 3.x only)."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        return get_ptxas(90)
    except TypeError:
        return get_ptxas()


def _ptxas_log_of(compiled) -> str:
    """Run Triton's ptxas on the PTX with -v (for kernels Triton took from its disk cache)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(compiled.asm["ptx"])
        out = subprocess.run([ptxas_tool().path, "-v", "--gpu-name=sm_90a", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    return out.stdout + out.stderr


def analyse(launch: Launch) -> dict:
    """Registers, spills, stack, shared memory and PTX facts of one compiled kernel."""
    key = id(launch.compiled)
    if key in _ANALYSIS:
        return _ANALYSIS[key]
    c = launch.compiled
    log = launch.ptxas_log if "registers" in launch.ptxas_log else _ptxas_log_of(c)
    facts = {}
    for name, rx in _PTXAS_RE.items():
        m = rx.search(log)
        facts[name] = int(m.group(1)) if m else -1
    ptx = c.asm["ptx"]
    md = c.metadata
    facts.update(
        smem=int(md.shared),
        num_warps=int(md.num_warps),
        tf32=len(re.findall(r"\btf32\b", ptx)),
        mma=len(re.findall(r"\bmma\.sync\b", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        # the instruction shapes (m64nNk16: a larger N moves fewer shared-memory bytes per flop)
        wgmma_shape=",".join(sorted(set(re.findall(
            r"\bwgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))),
        cp_async=len(re.findall(r"\bcp\.async\b", ptx)),
    )
    _ANALYSIS[key] = facts
    return facts


def occupancy(regs: int, smem: int, num_warps: int) -> int:
    """Resident CTAs per SM on sm_90 (registers allocated per warp in units of 256)."""
    threads = 32 * num_warps
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)
    return max(0, min(by_regs, by_smem, THREADS_PER_SM // threads, CTAS_PER_SM))


# ----------------------------------------------------------------------------- cases
def _meta(b, k, dtype):
    return torch.empty(b, k, dtype=dtype, device="meta")


def _gram_impl(variant):
    """``MINC_KERNELS_GRAM`` as the variant says (``"gram"``: e.g. ``triton_wide``, the wide
    tiles of rowmat on a rounded G), else the suite's ``triton``."""
    from benchmarks.calibrate import scoped_env

    return scoped_env({"MINC_KERNELS_GRAM": variant.get("gram", "triton")})


def _launch_spectral(b, k, dtype, need_grad, variant):
    from minc_kernels.ops import spectral as osp

    est = osp.estimate_seconds(b, k, dtype, need_grad)
    chosen = osp.choose_algorithm(b, k, dtype, need_grad)
    algo = variant.get("algorithm", chosen)
    with _gram_impl(variant):
        osp.spectral_forward(_meta(b, k, dtype), _meta(b, k, dtype), 1.0, True, algo,
                             need_grad)
    other = min(v for a, v in est.items() if a != algo)  # the best of the other algorithms
    return {"algorithm": algo, "auto_choice": chosen, "est_us": round(est[algo] * 1e6, 2),
            "est_other_us": round(other * 1e6, 2)}


def _launch_minc(b, k, dtype, need_grad, variant):
    from minc_kernels.ops import minc as om

    m = torch.empty(k, k, dtype=torch.float32, device="meta")
    gha = variant.get("ordering") == "gha"
    if not variant.get("step_only"):  # (benchmarks.triton_host: what MINCLoss runs, alone)
        # the functional form: the loss op and the batch moment
        om.minc_forward(_meta(b, k, dtype), _meta(b, k, dtype), m, gha, need_grad)
        om.moment_sum(_meta(b, k, dtype))
    # MINCLoss's default training step: the targets' map, moment and EMA, then the loss on
    # the map of p with its Jacobian
    counts = [torch.empty((), dtype=torch.int64, device="meta") for _ in range(2)]
    outs = om.moment_step_body([_meta(b, k, dtype)], m, *counts, 0.99, True, True, True)
    om.minc_l2_forward(_meta(b, k, dtype), outs[1], outs[0], gha, need_grad)
    return {"algorithm": "gha" if gha else "standard"}


def _launch_mio(b, k, dtype, need_grad, variant):
    from minc_kernels.ops import mio as oi

    oi.mio_forward(_meta(b, k, dtype), _meta(b, k, dtype), 0.1, 0.1, 0.0, need_grad)
    return {"algorithm": "flash"}


def _body(op):
    """The plain Python body of a ``torch.library.custom_op`` (called on meta tensors, the op
    itself would run its fake implementation, not the launchers)."""
    fn = getattr(op, "_init_fn", None)
    if fn is None:
        raise RuntimeError(f"{op}: this torch's CustomOpDef has no _init_fn; the suite "
                           "cannot reach the op's launchers")
    return fn


def _default(module_cls, name):
    import inspect

    return inspect.signature(module_cls).parameters[name].default


def _gram_pair_estimates(b, k, dtype, need_grad, algo, loss):
    """The cost model behind ``ops.barlow_twins.choose_algorithm``
    (``ops.barlow_twins.model_estimates``), µs."""
    from minc_kernels.ops.barlow_twins import model_estimates

    est = model_estimates(b, k, dtype, need_grad, loss)
    other = "gram" if algo == "pairwise" else "pairwise"
    return {"est_us": round(est[algo] * 1e6, 2), "est_other_us": round(est[other] * 1e6, 2)}


def _launch_barlow_twins(b, k, dtype, need_grad, variant):
    from minc_kernels.losses.barlow_twins import BarlowTwinsLoss
    from minc_kernels.ops import barlow_twins as ob

    za, zb = _meta(b, k, dtype), _meta(b, k, dtype)
    if variant.get("distributed"):
        # gather_distributed=True: the rank's Ẑaᵀ Ẑb (op barlow_twins_cross_corr) and, with
        # the gradient, its backward op (rowmat twice, then the standardisation's Jacobian)
        c, na, nb, stats = _body(ob.barlow_twins_cross_corr)(za, zb)
        if need_grad:
            _body(ob.barlow_twins_cross_corr_backward)(torch.empty_like(c), za, zb, na, nb,
                                                       stats)
        return {"algorithm": "cross_corr"}
    chosen = ob.choose_algorithm(b, k, dtype, need_grad)
    algo = variant.get("algorithm", chosen)
    with _gram_impl(variant):
        ob.barlow_twins_forward(za, zb, _default(BarlowTwinsLoss, "lambda_param"), algo,
                                need_grad)
    return {"algorithm": algo, "auto_choice": chosen,
            **_gram_pair_estimates(b, k, dtype, need_grad, algo, "barlow_twins")}


def _launch_vicreg(b, k, dtype, need_grad, variant):
    from minc_kernels.losses.vicreg import VICRegLoss
    from minc_kernels.ops import barlow_twins as ob
    from minc_kernels.ops import vicreg as ov

    chosen = ob.choose_algorithm(b, k, dtype, need_grad, loss="vicreg")
    algo = variant.get("algorithm", chosen)
    hp = [_default(VICRegLoss, n) for n in ("lambda_param", "mu_param", "nu_param", "eps")]
    ov.vicreg_forward(_meta(b, k, dtype), _meta(b, k, dtype), *hp, algo, need_grad)
    return {"algorithm": algo, "auto_choice": chosen,
            **_gram_pair_estimates(b, k, dtype, need_grad, algo, "vicreg")}


# How to run an op's launchers on meta tensors, by the registry's ``op`` name: the label of
# the default call, the launcher, the variants that change only the gradient (run with
# grad only), and the suite's own variants beyond the registry's (label -> keywords for the
# launcher).  The registry has no such hook yet, so an op missing here is listed as
# uncovered (:func:`uncovered_losses`) instead of being skipped silently.
# "gram_wide": the k×k path with rowmat's wide tiles on the rounded operand
# (MINC_KERNELS_GRAM=triton_wide, a candidate only a measured table picks), bf16 with the
# gradient only (no other case launches a rounded-operand rowmat).
_WIDE = {"gram_wide": {"algorithm": "gram", "gram": "triton_wide"}}
LAUNCHERS = {
    "spectral": ("auto", _launch_spectral, ("gram_wide",), dict(_WIDE)),
    "minc": ("standard", _launch_minc, ("gha",), {}),
    "mio": ("flash", _launch_mio, (), {}),
    "barlow_twins": ("auto", _launch_barlow_twins, ("gram_wide",),
                     {"cross_corr": {"distributed": True}, **_WIDE}),
    "vicreg": ("auto", _launch_vicreg, (), {}),
}
# Losses whose variants force the algorithm that ``auto`` would choose by a cost model:
# only the auto choice (what the loss runs) is checked for grid fill.
ALGORITHM_CHOICE = {"spectral", "barlow_twins", "vicreg"}
FORCED_ALGORITHMS = ("pairwise", "matrix", "gram", "gram_wide")


def covered_losses() -> dict:
    """Registry losses whose op this suite can launch on meta tensors: name -> spec."""
    from minc_kernels.losses import REGISTRY

    return {n: s for n, s in REGISTRY.items() if s.op in LAUNCHERS}


def uncovered_losses() -> list[str]:
    """Registry losses with kernels that this suite cannot launch (no entry in LAUNCHERS)."""
    from minc_kernels.losses import REGISTRY

    return [n for n, s in REGISTRY.items() if s.op and s.op not in LAUNCHERS]


def run_case(loss: str, b: int, k: int, dtype: torch.dtype, need_grad: bool, variant: str,
             **options):
    """Call the op's real launchers on meta tensors; returns (launches, extra facts).
    ``options``: more keyword arguments of the launcher (``step_only=True``: MINC's
    ``MINCLoss`` step without the functional op)."""
    from minc_kernels.losses import REGISTRY

    if loss not in REGISTRY:
        raise ValueError(f"unknown loss {loss!r}; the registry has {list(REGISTRY)}")
    spec = REGISTRY[loss]
    if spec.op not in LAUNCHERS:
        raise ValueError(f"{loss}: no meta-tensor launcher for op {spec.op!r} (LAUNCHERS)")
    default, launch, _, extra_variants = LAUNCHERS[spec.op]
    if variant == default:
        kwargs = {}
    elif variant in extra_variants:
        kwargs = dict(extra_variants[variant])
    else:
        kwargs = dict(spec.variants[variant])
    kwargs.update(options)
    with compile_launches_for_sm90() as rec:
        extra = launch(b, k, dtype, need_grad, kwargs)
    return rec, extra


def rows_of_case(loss, b, k, dtype_name, need_grad, variant):
    dtype = DTYPES[dtype_name]
    launches, extra = run_case(loss, b, k, dtype, need_grad, variant)
    rows, seen = [], set()
    for ln in launches:
        facts = analyse(ln)
        key = (ln.kernel, ln.grid, id(ln.compiled))
        if key in seen:  # MIO's strip loop launches one kernel per row group
            continue
        seen.add(key)
        programs = ln.grid[0] * ln.grid[1] * ln.grid[2]
        occ = occupancy(facts["regs"], facts["smem"], facts["num_warps"])
        tiles = {k_: v for k_, v in ln.constexprs.items() if k_.startswith("BLOCK") or k_ in (
            "num_warps", "num_stages", "ACC_IN_REGS", "GROUP")}
        variant_flags = {k_: v for k_, v in ln.constexprs.items() if k_ in (
            "NEED_GRAD", "GHA", "COMPUTE_GRAD", "DOT_WITH_OTHER", "MODE", "CLIP",
            "STANDARDIZE", "INVARIANCE", "VIEWS")}
        work, rate = useful_work(ln.kernel, b, k, need_grad, dtype_name, ln.grid, tiles,
                                 variant_flags, ln.dims)
        rows.append(dict(
            ideal_us=round(work / rate * 1e6, 3),
            loss=loss, variant=variant, B=b, k=k, dtype=dtype_name, grad=bool(need_grad),
            kernel=ln.kernel, flags=variant_flags, tiles=tiles, grid=list(ln.grid),
            dims=list(ln.dims) if ln.dims else None,
            programs=programs, ctas_per_sm=occ,
            waves=round(programs / (SMS * occ), 3) if occ else None,
            sm_fill=round(min(1.0, programs / SMS), 3),
            heavy=ln.kernel in HEAVY, **facts, **extra,
        ))
    return rows


def shape_grid(subset: str):
    """(loss, B, k, dtype, need_grad, variant) cases."""
    if subset == "ci":
        # Representative: benchmark shapes where fill matters (B 256 and 1024), both MIO
        # paths (k <= 256 in registers, the strip above), odd k with B aligned and with B
        # odd (ptxas allocates the two unaligned specialisations differently), every dtype
        # and both gradient modes of every kernel variant, and odd k just past a tile edge
        # with an odd B (k = 130 = 128 + 2 at B = 1031: the shape issue 21 found
        # mio_grad_finalize spilling at, which no other shape here showed).  About 150
        # compiled variants, ~150 s of CPU with a cold Triton cache: the full grid is the
        # generator's job.
        shapes = [(1024, 128), (1024, 1001), (1023, 1001), (256, 8192), (1031, 130)]
        dts = ("fp32", "bf16", "fp16")
    elif subset == "full":
        # odd sizes: B 1023 (one short of a tile edge), 1031 (just past one); k 1001, and
        # 130 / 257 (just past the 128 and 256 tile edges)
        bs = (256, 1024, 4096, 8192, 32768, 1023, 1031)
        ks = (64, 128, 512, 1024, 2048, 8192, 1001, 130, 257)
        shapes = [(b, k) for b in bs for k in ks]
        dts = ("fp32", "bf16", "fp16")
    else:
        raise ValueError(f"subset must be 'ci' or 'full', got {subset!r}")
    variants, extra_variants = {}, {}
    for loss, spec in covered_losses().items():
        default, _, grad_only, extra = LAUNCHERS[spec.op]
        variants[loss] = ([default] + list(spec.variants) + list(extra), grad_only)
        extra_variants[loss] = set(extra)
    cases = []
    for b, k in shapes:
        for dt in dts:
            for g in (False, True):
                for loss, (vs, grad_only) in variants.items():
                    for v in vs:
                        if v in grad_only and not g:
                            continue  # e.g. MINC's GHA changes only the gradient
                        if v in _WIDE and dt != "bf16":
                            continue  # only bf16 rows take a rounded operand
                        if loss == "spectral" and v != "auto" and subset == "ci":
                            # CI: the auto choice plus the pairwise path at the shapes the
                            # issue names (B 256-4096 with k <= 1024)
                            if v not in ("pairwise", "gram_wide") or k > 1024:
                                continue
                        if (loss in ("barlow_twins", "vicreg") and v != "auto"
                                and subset == "ci"):
                            # CI: the auto choice, plus both forced algorithms (the N×N
                            # and the k×k path) at k <= 1024; the distributed op
                            # (cross_corr) compiles the gram path's kernels: full grid only
                            if v in extra_variants[loss] or k > 1024:
                                continue
                        cases.append((loss, b, k, dt, g, v))
    return cases


# ----------------------------------------------------------------------------- checks
def in_bench_shapes(r) -> bool:
    return BENCH_B[0] <= r["B"] <= BENCH_B[1] and BENCH_K[0] <= r["k"] <= BENCH_K[1]


def fill_checked(r) -> bool:
    """Whether a launch's grid fill is asserted: a heavy launch the loss actually runs (not a
    forced algorithm that ``auto`` did not choose) at the benchmark shapes, with at least
    LATENCY_BOUND_US of ideal work."""
    forced = r["loss"] in ALGORITHM_CHOICE and r["variant"] in FORCED_ALGORITHMS
    return (not forced and r["heavy"] and in_bench_shapes(r)
            and r["ideal_us"] >= LATENCY_BOUND_US)


def violations(rows) -> list[str]:
    """What the CI test asserts; see the module docstring and issue 14."""
    out = []
    for r in rows:
        tag = (f"{r['kernel']} {r['loss']}/{r['variant']} B={r['B']} k={r['k']} {r['dtype']} "
               f"grad={r['grad']}")
        if r["regs"] < 0:
            out.append(f"{tag}: no ptxas info")
        if r["spill_st"] > 0 or r["spill_ld"] > 0:
            out.append(f"{tag}: spills {r['spill_st']} B stores / {r['spill_ld']} B loads")
        if r["smem"] > SMEM_PER_CTA_MAX:
            out.append(f"{tag}: shared memory {r['smem']} B > 227 KB")
        if r["dtype"] == "fp32" and (r["tf32"] or r["mma"] or r["wgmma"]):
            out.append(f"{tag}: fp32 variant uses tf32/mma ({r['tf32']}/{r['mma']}/{r['wgmma']})")
        if r["regs"] >= REG_LIMIT:
            out.append(f"{tag}: {r['regs']} registers (>= {REG_LIMIT})")
        if r["ctas_per_sm"] < 1:
            out.append(f"{tag}: does not fit on an SM")
        # Grid fill: only the launches the loss actually runs (spectral, Barlow Twins,
        # VICReg: the cost model's choice) at the benchmark shapes (fill_checked).
        if fill_checked(r) and r["programs"] < SMS:
            out.append(f"{tag}: grid {r['grid']} = {r['programs']} programs < {SMS} SMs "
                       f"(ideal {r['ideal_us']} us)")
    return out


# ----------------------------------------------------------------------------- output
def _versions():
    commit = os.environ.get("MINC_KERNELS_GIT_COMMIT", "")[:7]  # a tree without .git
    try:
        commit = commit or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    except OSError:
        commit = ""
    return {"target": "sm_90 (GPUTarget('cuda', 90, 32)), compiled only, nothing run",
            "triton": triton.__version__, "torch": torch.__version__,
            "ptxas": ptxas_tool().version, "python": platform.python_version(),
            "git_commit": commit, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "machine": f"{platform.node()} (CPU only)"}


def large_batch_summary(rows, dtype: str = "bf16", min_b: int = 4096) -> list[dict]:
    """Per heavy kernel, over the launches the losses run (``auto`` or their only path; not
    a forced algorithm) at B >= ``min_b`` and k in BENCH_K, in ``dtype``: how many use
    wgmma, reach 132 programs, and reach one full wave (programs >= 132 × resident CTAs
    per SM), and the fewest waves (issue 21: "wgmma in the bf16 Gram-path kernels and full
    waves at B >= 4096")."""
    out = {}
    for r in rows:
        forced = r["loss"] in ALGORITHM_CHOICE and r["variant"] in FORCED_ALGORITHMS
        if (forced or not r["heavy"] or r["dtype"] != dtype or r["B"] < min_b
                or not BENCH_K[0] <= r["k"] <= BENCH_K[1]):
            continue
        s = out.setdefault(r["kernel"], dict(kernel=r["kernel"], launches=0, wgmma=0,
                                             fill=0, full_wave=0, fewest_waves=None))
        s["launches"] += 1
        s["wgmma"] += bool(r["wgmma"])
        s["fill"] += r["programs"] >= SMS
        s["full_wave"] += bool(r["waves"] is not None and r["waves"] >= 1.0)
        if r["waves"] is not None and (s["fewest_waves"] is None or r["waves"] < s["fewest_waves"]):
            s["fewest_waves"] = r["waves"]
    return sorted(out.values(), key=lambda s: s["kernel"])


def _fmt_tiles(t):
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_C": "C", "BLOCK_B": "B",
             "BLOCK_R": "R", "num_warps": "w", "num_stages": "s", "ACC_IN_REGS": "regs",
             "GROUP": "G"}
    return " ".join(f"{short.get(k, k)}{int(v)}" for k, v in t.items())


def write_markdown(rows, meta, viol, path: Path):
    lines = [
        "# Static sm_90 suite", "",
        "Every Triton launch of the ops, compiled for sm_90 through the real launchers "
        "(`python -m benchmarks.static_sm90`); nothing was run on a GPU.", "",
        "| " + " | ".join(f"{k}: {v}" for k, v in meta.items()) + " |",
        "|" + "---|" * len(meta), "",
        f"Violations of the CI checks: {len(viol)}", "",
    ]
    lines += [f"- {v}" for v in viol[:200]]
    summary = large_batch_summary(rows)
    if summary:
        lines += ["", "Heavy bf16 launches at B >= 4096, k 128-8192, of the paths the losses "
                  "run (not forced algorithms): tensor cores and fill "
                  "(`large_batch_summary`; full wave: programs >= 132 × resident CTAs/SM).", "",
                  "| kernel | launches | with wgmma | >= 132 programs | >= 1 full wave "
                  "| fewest waves |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['kernel']} | {s['launches']} | {s['wgmma']} | {s['fill']} "
                  f"| {s['full_wave']} | {s['fewest_waves']} |" for s in summary]
    lines += ["", "Columns: regs = registers/thread, spill = spill store+load bytes, smem = "
              "dynamic shared memory (KB), occ = resident CTAs/SM, fill = min(1, programs/132), "
              "waves = programs/(132·occ), ideal = µs of the launch's useful flops at peak on "
              "132 SMs (colstats kernels: its bytes at 3 TB/s; fill is asserted only from 5 µs up), "
              "tf32/mma/wgmma/cp.async = counts in the PTX (wgmma: with its instruction shapes), "
              "est = cost-model µs of the launched algorithm (the best other algorithm in brackets).", "",
              "| loss | variant | B | k | dtype | grad | kernel | tiles | grid | programs | "
              "regs | spill | smem KB | occ | waves | fill | ideal µs | tf32/mma/wgmma | cp.async | est µs |",
              "|" + "---|" * 20]
    for r in rows:
        est = f"{r['est_us']} ({r['est_other_us']})" if "est_us" in r else ""
        lines.append(
            f"| {r['loss']} | {r['variant']}{'→' + r['algorithm'] if r['variant'] == 'auto' else ''} "
            f"| {r['B']} | {r['k']} | {r['dtype']} | {int(r['grad'])} | {r['kernel']} "
            f"| {_fmt_tiles(r['tiles'])} | {'×'.join(map(str, r['grid']))} | {r['programs']} "
            f"| {r['regs']} | {r['spill_st'] + r['spill_ld']} | {r['smem'] / 1024:.1f} "
            f"| {r['ctas_per_sm']} | {r['waves']} | {r['sm_fill']} | {r['ideal_us']} "
            f"| {r['tf32']}/{r['mma']}/{r['wgmma']}"
            f"{' ' + r['wgmma_shape'] if r.get('wgmma_shape') else ''} | {r['cp_async']} | {est} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for results.json and results.md")
    ap.add_argument("--subset", default="full", choices=("full", "ci"),
                    help="full: the whole shape grid (default); ci: the CI test's subset")
    ap.add_argument("--json-only", action="store_true", help="skip the Markdown table")
    ap.add_argument("--check", action="store_true", help="exit 1 if any CI check fails")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    cases = shape_grid(a.subset)
    for i, case in enumerate(cases):
        rows += rows_of_case(*case)
        if (i + 1) % 25 == 0:
            print(f"[{time.time() - t0:6.0f} s] {i + 1}/{len(cases)} cases, "
                  f"{len(_ANALYSIS)} compiled variants", flush=True)
    viol = violations(rows)
    meta = _versions()
    meta.update(subset=a.subset, cases=len(cases), launches=len(rows),
                compiled_variants=len(_ANALYSIS), seconds=round(time.time() - t0, 1),
                losses=list(covered_losses()), uncovered_losses=uncovered_losses())
    # one launch per line: a diff of the committed table shows which launches changed
    body = ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
    (out / "results.json").write_text(
        '{"meta": ' + json.dumps(meta) + ',\n"violations": ' + json.dumps(viol, indent=1)
        + ',\n"rows": [\n' + body + "\n]}\n")
    if not a.json_only:
        write_markdown(rows, meta, viol, out / "results.md")
    print(f"{len(cases)} cases, {len(rows)} launches, {len(_ANALYSIS)} compiled variants, "
          f"{len(viol)} violations, {time.time() - t0:.0f} s; files in {out}")
    if meta["uncovered_losses"]:
        print(f"NOT COVERED (no meta-tensor launcher in LAUNCHERS): {meta['uncovered_losses']}")
    for v in viol[:40]:
        print("  " + v)
    return 1 if (a.check and viol) else 0


if __name__ == "__main__":
    sys.exit(main())
