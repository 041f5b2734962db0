"""Static sm_90 suite (issue 14): every Triton launch compiled for Hopper, no GPU needed.

Runs ``python -m benchmarks.static_sm90 --subset ci`` in a subprocess (the compiler needs
the real JIT, not this session's interpreter): the ops' real launchers on meta tensors,
Triton's own specialisation, ptxas -v.  The full shape grid is the generator's job; its
table is committed under ``benchmarks/results/static-sm90/``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import static_sm90 as S  # noqa: E402  (module import leaves TRITON_INTERPRET be)

ROOT = Path(__file__).resolve().parent.parent


def _has_sm90_compiler() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        return os.path.exists(S.ptxas_tool().path)
    except Exception:  # pragma: no cover - a triton without the NVIDIA backend
        return False


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    if not _has_sm90_compiler():
        pytest.skip("triton has no NVIDIA backend / ptxas here")
    out = tmp_path_factory.mktemp("static-sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run([sys.executable, "-m", "benchmarks.static_sm90", "--subset", "ci",
                          "--json-only", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads((out / "results.json").read_text())["rows"]


def _tag(r):
    return f"{r['kernel']} {r['loss']}/{r['variant']} B={r['B']} k={r['k']} {r['dtype']} grad={r['grad']}"


def test_every_kernel_and_dtype_is_covered(rows):
    kernels = {r["kernel"] for r in rows}
    assert kernels >= S.HEAVY | {"clip_rows_dot_kernel", "clip_rows_backward_kernel",
                                 "mio_normalize_rows", "mio_grad_finalize", "mio_loss_combine"}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16", "fp16"}
    assert {r["grad"] for r in rows} == {False, True}
    assert any(r["k"] % 16 and r["B"] % 16 for r in rows)  # the unaligned specialisation
    assert all(r["regs"] > 0 for r in rows), [_tag(r) for r in rows if r["regs"] <= 0]


def test_no_spills_and_shared_memory_fits(rows):
    bad = [(_tag(r), r["spill_st"], r["spill_ld"]) for r in rows if r["spill_st"] or r["spill_ld"]]
    assert not bad
    assert not [_tag(r) for r in rows if r["smem"] > S.SMEM_PER_CTA_MAX]


def test_registers_below_255(rows):
    assert not [(_tag(r), r["regs"]) for r in rows if r["regs"] >= S.REG_LIMIT]


def test_fp32_variants_stay_off_tf32_and_mma(rows):
    fp32 = [r for r in rows if r["dtype"] == "fp32"]
    assert fp32
    assert not [_tag(r) for r in fp32 if r["tf32"] or r["mma"] or r["wgmma"]]
    # the half variants do use the tensor cores (the counts can fail)
    assert any(r["wgmma"] for r in rows if r["dtype"] == "bf16")


def test_heavy_launches_fill_132_sms_at_benchmark_shapes(rows):
    checked = [r for r in rows if r["heavy"] and S.in_bench_shapes(r)
               and not (r["loss"] == "spectral" and r["variant"] != "auto")
               and r["ideal_us"] >= S.LATENCY_BOUND_US]
    assert checked
    assert not [(_tag(r), r["grid"]) for r in checked if r["programs"] < S.SMS]


def test_spectral_pairwise_column_stream_is_split(rows):
    """Issue 14 item 1: without the gradient the pairwise grid was (B/64) programs (16 at
    B = 1024); the split column stream fills the device."""
    pw = [r for r in rows if r["kernel"] == "pairwise_offdiag_kernel" and not r["grad"]
          and r["B"] >= 1023]
    assert pw and all(r["grid"][2] > 1 and r["programs"] >= S.SMS for r in pw), \
        [(r["B"], r["k"], r["grid"]) for r in pw]


def test_gha_rowmat_is_pipelined(rows):
    """Issue 14 item 2: the GHA variant's dots were inside `if`s of the K loop: no async
    copies and no wgmma.  Statically bounded loops restore both (aligned half inputs)."""
    gha = [r for r in rows if r["kernel"] == "rowmat_kernel" and r["flags"].get("GHA")
           and r["flags"].get("NEED_GRAD") and r["dtype"] != "fp32" and r["k"] % 16 == 0]
    assert gha and all(r["cp_async"] > 0 for r in gha), [(_tag(r), r["cp_async"]) for r in gha]
    # wgmma needs 64-row tiles (small B·k takes 16-32 rows to fill the SMs: mma.sync then)
    wide = [r for r in gha if r["tiles"]["BLOCK_M"] >= 64]
    assert wide and all(r["wgmma"] > 0 for r in wide), [(_tag(r), r["wgmma"]) for r in wide]


def test_violations_flags_each_defect():
    """The checker itself can fail: one synthetic row per defect."""
    base = dict(kernel="pairwise_offdiag_kernel", loss="spectral", variant="auto", B=1024,
                k=1024, dtype="bf16", grad=False, regs=128, spill_st=0, spill_ld=0, stack=0,
                smem=48 * 1024, tf32=0, mma=0, wgmma=4, ctas_per_sm=1, heavy=True,
                programs=256, grid=[16, 1, 16], ideal_us=50.0)
    assert S.violations([base]) == []
    for change, word in [(dict(spill_st=8), "spills"), (dict(smem=228 * 1024), "shared"),
                         (dict(dtype="fp32", wgmma=4), "tf32"), (dict(regs=255), "registers"),
                         (dict(programs=16, grid=[16, 1, 1]), "programs")]:
        v = S.violations([{**base, **change}])
        assert len(v) == 1 and word in v[0], (change, v)
    # latency-bound launches and forced (non-auto) spectral algorithms are not fill-checked
    assert S.violations([{**base, "programs": 16, "ideal_us": 1.0}]) == []
    assert S.violations([{**base, "programs": 16, "variant": "pairwise"}]) == []


def test_occupancy_model():
    assert S.occupancy(regs=255, smem=0, num_warps=8) == 1
    assert S.occupancy(regs=128, smem=0, num_warps=8) == 2
    assert S.occupancy(regs=32, smem=0, num_warps=4) == 16
    assert S.occupancy(regs=64, smem=100 * 1024, num_warps=4) == 2
    assert torch.float32 in S.DTYPES.values()


def test_committed_full_table_is_clean():
    """The committed full-grid table (regenerated by the command in its README) holds every
    shape class of the issue and no violation of the checks above."""
    data = json.loads((ROOT / "benchmarks/results/static-sm90/results.json").read_text())
    rows_ = data["rows"]
    assert data["meta"]["subset"] == "full"
    assert {256, 32768, 1023} <= {r["B"] for r in rows_}
    assert {64, 8192, 1001} <= {r["k"] for r in rows_}
    assert S.violations(rows_) == data["violations"] == []
