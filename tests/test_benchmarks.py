"""The benchmark runner works end to end on the CPU (tiny grid) and its numbers are consistent."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases, floors, report, run
from benchmarks.timing import Budget, is_oom, measure
from minc_kernels import _backend

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# --device cpu: the same tests pass on a GPU machine (see test_runner_on_cuda for CUDA).
TINY = ["--device", "cpu", "--B", "8,16", "--k", "4", "--case-ms", "5", "--max-reps", "5",
        "--no-progress", "--losses", "spectral,minc,mio"]
HAS_CUDA = torch.cuda.is_available()


def _load(out):
    return json.loads((out / "results.json").read_text())


def test_runner_end_to_end_writes_json_markdown_plots(tmp_path):
    out = tmp_path / "res"
    rc = run.main(["--out", str(out), *TINY, "--providers", "eager", "--modes", "fwd+bwd,bwd",
                   "--ema", "resnet18", "--ema-providers", "loop,foreach,minc_kernels"])
    assert rc == 0
    data = _load(out)
    meta = data["meta"]
    assert meta["device"].startswith("CPU") and meta["device_type"] == "cpu"
    for key in ("torch", "triton", "cuda", "git_commit", "date_utc", "extension", "ops"):
        assert key in meta
    assert data["ceilings"]["copy"]["gbps"] > 0
    assert data["ceilings"]["matmul"]["float32"]["tflops"] > 0
    ceil = data["ceilings"]
    assert 0 < ceil["launch"]["ms"] <= ceil["launch"]["median_ms"]
    assert 0 < ceil["custom_op"]["fwd_ms"] < ceil["custom_op"]["fwd_bwd_ms"]
    for r in data["cases"]:  # every case has its floor, at or below the measurement
        assert r["floor"]["launch_ms"] == pytest.approx(
            ceil["launch"]["ms"] * (2 if r["mode"] == "fwd+bwd" else 1))
        assert r["floor"]["ms"] == max(v for k_, v in r["floor"].items()
                                       if k_.endswith("_ms") and k_ != "ms" and v is not None)
        assert r["frac_floor"] == pytest.approx(r["floor"]["ms"] / r["median_ms"])

    recs = data["cases"]
    # 2 modes × (spectral: 2 eager entries + minc + mio) × 2 batch sizes
    assert len(recs) == 2 * 4 * 2
    assert {r["provider"] for r in recs} == {"eager", "eager-pairwise", "eager-gram"}
    assert [r["mode"] for r in recs[:8]] == ["fwd+bwd"] * 8  # most important mode first
    for r in recs:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["reps"] >= 1 and r["peak_mb"] is None
        assert r["flops"] == cases.loss_flops(r["loss"], r["algorithm"], r["B"], r["k"], r["mode"])
        assert math.isclose(r["tflops"], r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["frac_matmul"] == pytest.approx(
            r["tflops"] / data["ceilings"]["matmul"]["float32"]["tflops"])
    for (loss, mode, b) in {(r["loss"], r["mode"], r["B"]) for r in recs}:
        same = [r for r in recs if (r["loss"], r["mode"], r["B"]) == (loss, mode, b)]
        best = min(same, key=lambda r: r["median_ms"])
        assert best["speedup_vs_eager"] == pytest.approx(1.0)
        assert all(r["speedup_vs_eager"] <= 1.0 + 1e-12 for r in same)

    ema = data["ema"]
    assert len(ema) == 2 * 3
    for r in ema:
        assert r["bytes_per_param"] == (12 if r["online_dtype"] == "fp32" else 10)
        if r["provider"] == "minc_kernels" and r["status"] != "ok":
            assert r["status"] == "skipped" and "extension" in r["reason"]
        else:
            assert r["status"] == "ok", r
            expect = r["bytes_per_param"] * r["n_params"] / (r["median_ms"] * 1e-3) / 1e9
            assert r["gbps"] == pytest.approx(expect)
            assert r["frac_copy"] == pytest.approx(expect / data["ceilings"]["copy"]["gbps"])

    md = (out / "results.md").read_text()
    for loss in ("spectral", "minc", "mio"):
        for mode in ("fwd+bwd", "bwd"):
            assert f"## {loss}, {mode}, fp32" in md
    assert "| B | k | eager-pairwise ms | eager-gram ms |" in md
    assert "launch floor" in md and "custom op with a registered backward" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "time_spectral_fwd_bwd_fp32.png" in pngs and "ema.png" in pngs
    assert not [p for p in pngs if p.startswith("speedup_")]  # eager only: nothing to compare
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"({name})" in md

    # The report CLI rebuilds the same tables from the JSON alone.
    (out / "results.md").unlink()
    assert report.main([str(out), "--no-plots", "--quiet"]) == 0
    assert "## mio, bwd, fp32" in (out / "results.md").read_text()


def test_compile_provider_times_forward_and_replayed_backward(tmp_path):
    out = tmp_path / "res"
    run.main(["--out", str(out), *TINY, "--B", "8", "--losses", "minc", "--providers",
              "eager,compile", "--modes", "fwd+bwd,bwd", "--ema", "off", "--no-ceilings"])
    recs = _load(out)["cases"]
    assert (out / "speedup_minc_fp32.png").read_bytes()[:8] == PNG_MAGIC
    comp = [r for r in recs if r["provider"] == "compile"]
    assert [r["mode"] for r in comp] == ["fwd+bwd", "bwd"]
    # bwd replays backward(retain_graph=True): needs the donated-buffer-free compile.
    for r in comp:
        assert r["status"] == "ok", r["reason"]
        assert r["median_ms"] > 0 and r["speedup_vs_eager"] > 0


def test_minc_kernels_provider_skipped_or_run_under_interpreter(tmp_path):
    out = tmp_path / "res"
    run.main(["--out", str(out), *TINY, "--B", "8", "--modes", "fwd+bwd", "--providers",
              "minc_kernels", "--ema", "off", "--no-ceilings", "--no-plots"])
    for r in _load(out)["cases"]:
        # Without CUDA and without --interpret the kernels are never run on the CPU.
        assert r["status"] == "skipped" and "--interpret" in r["reason"]

    if HAS_CUDA:
        return  # --interpret would switch Triton to its interpreter for the whole process
    out2 = tmp_path / "res2"
    run.main(["--out", str(out2), *TINY, "--B", "8", "--modes", "fwd+bwd", "--providers",
              "eager,minc_kernels", "--interpret", "--ema", "off", "--no-ceilings", "--no-plots"])
    recs = _load(out2)["cases"]
    for r in recs:
        if r["family"] != "minc_kernels":
            continue
        ok, why = _backend.op_status(cases.OP_NAME[r["loss"]])
        if ok:
            assert r["status"] == "ok", r["reason"]
            assert r["grad_in_forward"] and r["bytes"] > 0
            assert r["speedup_vs_eager"] is not None
        else:
            assert r["status"] == "skipped" and "triton op unavailable" in r["reason"]


def test_out_of_memory_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = cases.loss_fn

    def fake(loss, entry, compiled, mode="fwd+bwd"):
        if loss == "mio":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")
        return real(loss, entry, compiled, mode)

    monkeypatch.setattr(cases, "loss_fn", fake)
    out = tmp_path / "res"
    run.main(["--out", str(out), *TINY, "--B", "8", "--providers", "eager", "--modes", "fwd",
              "--ema", "off", "--no-ceilings"])
    recs = _load(out)["cases"]
    by_loss = {r["loss"]: r for r in recs}
    assert by_loss["mio"]["status"] == "oom" and "out of memory" in by_loss["mio"]["reason"]
    assert by_loss["minc"]["status"] == "ok"
    assert "OOM" in (out / "results.md").read_text()


def test_time_budget_skips_cases_but_still_writes_tables(tmp_path):
    out = tmp_path / "res"
    run.main(["--out", str(out), *TINY, "--providers", "eager", "--modes", "fwd",
              "--ema", "off", "--no-ceilings", "--time-budget", "1e-9", "--no-plots"])
    recs = _load(out)["cases"]
    assert recs and all(r["status"] == "skipped" and "budget" in r["reason"] for r in recs)
    assert (out / "results.md").exists()


def test_plan_order_and_memory_case():
    args = run.parse_args(["--B", "8", "--k", "4", "--memory-case", "on"])
    plan = run.loss_plan(args, torch.device("cpu"), ["fp32"])
    modes = [p[0] for p in plan]
    first_fwd = modes.index("fwd")
    assert set(modes[:first_fwd]) == {"fwd+bwd"}
    # The MIO memory case comes right after the fwd+bwd grid, before fwd/bwd.
    assert plan[first_fwd - 1] == ("fwd+bwd", "mio", 32768, 128, "fp32", "memory")
    assert not [p for p in run.loss_plan(run.parse_args([]), torch.device("cpu"), ["fp32"])
                if p[5] == "memory"]
    with pytest.raises(SystemExit):
        run.parse_args(["--losses", "nope"])


def test_losses_and_providers_come_from_the_registry():
    """The benchmarks list no loss of their own: names, inputs, calls, the compile
    reference and the kernel op come from minc_kernels.losses.REGISTRY."""
    from minc_kernels.losses import REGISTRY

    assert cases.LOSSES == tuple(REGISTRY) == run.parse_args([]).losses
    for name, s in REGISTRY.items():
        inputs = cases.make_inputs(name, 8, 4, torch.float32, torch.device("cpu"))
        assert len(inputs.args) == len(s.arg_names)
        assert [i for i, x in enumerate(inputs.args) if x.requires_grad] == list(s.grad_args)
        assert cases.OP_NAME[name] == s.op
        labels = [e.label for e in cases.provider_entries(name, cases.PROVIDERS)]
        algos = [v for v, kw in s.variants.items()
                 if set(kw) == {"algorithm"} and v not in s.eager_alias]
        assert labels == ([f"eager-{a}" for a in algos] or ["eager"]) + ["compile",
                                                                         "minc_kernels"]
        # eager = the registry's step on the reference backend, equal to its reference
        entry = cases.provider_entries(name, ("eager",))[0]
        got = cases.loss_fn(name, entry, cases.CompiledCache())(*inputs.args)
        torch.testing.assert_close(got, s.reference(*inputs.args))
        # flops: the floors model for the modelled losses, else the registry's
        fwd, bwd = s.matmul_flops(64, 32)
        if name not in ("spectral",):  # spectral's registry pair is one algorithm's
            assert cases.loss_flops(name, None, 64, 32, "fwd") == fwd
            assert cases.loss_flops(name, None, 64, 32, "bwd") == bwd
    assert cases.algorithms("spectral") == ["pairwise", "matrix", "gram"]
    # one eager baseline per distinct eager evaluation: "matrix" is eager "pairwise"
    assert [e.label for e in cases.provider_entries("spectral", ("eager",))] == [
        "eager-pairwise", "eager-gram"]
    assert cases.algorithms("minc") == []  # gha changes the gradient: not a baseline
    with pytest.raises(ValueError, match="registry"):
        cases.make_inputs("nope", 8, 4, torch.float32, torch.device("cpu"))


def test_flop_models():
    b, k = 1024, 256
    assert cases.loss_flops("spectral", "pairwise", b, k, "fwd") == 2 * b * b * k
    assert cases.loss_flops("spectral", "pairwise", b, k, "fwd+bwd") == 6 * b * b * k
    assert cases.loss_flops("spectral", "gram", b, k, "bwd") == 4 * b * k * k
    for mode in ("fwd", "bwd", "fwd+bwd"):
        assert cases.loss_flops("spectral", "auto", b, k, mode) == min(
            cases.loss_flops("spectral", "pairwise", b, k, mode),
            cases.loss_flops("spectral", "gram", b, k, mode))
    assert cases.loss_flops("minc", None, b, k, "fwd+bwd") == 6 * b * k * k
    assert cases.loss_flops("mio", None, b, k, "fwd") == 8 * b * b * k


def test_fused_gradient_providers_are_credited_in_fwd_not_bwd():
    """The minc_kernels ops form the gradient in the forward: their bwd does no matmul work
    (the H200 report printed up to 870 % of the matmul peak for it)."""
    b, k = 1024, 256
    assert cases.grad_in_forward("minc_kernels") and not cases.grad_in_forward("eager")
    assert not cases.grad_in_forward("compile")
    for loss, algo in (("spectral", "pairwise"), ("spectral", "gram"), ("spectral", "auto"),
                       ("minc", None), ("mio", None)):
        whole = cases.loss_flops(loss, algo, b, k, "fwd+bwd", grad_in_forward=True)
        assert cases.loss_flops(loss, algo, b, k, "bwd", grad_in_forward=True) == 0.0
        assert cases.loss_flops(loss, algo, b, k, "fwd", grad_in_forward=True) == whole
        if loss != "minc":  # the same products, moved into the forward
            assert whole == cases.loss_flops(loss, algo, b, k, "fwd+bwd")
    # MINC's fused gradient (2/B)(M p - t) reuses the loss's P M: moment + P M only.
    assert cases.loss_flops("minc", None, b, k, "fwd+bwd", grad_in_forward=True) == 4 * b * k * k
    # Bytes: the fused provider writes its fp32 gradient in fwd and reads it in bwd.
    x, g = b * k * 2, b * k * 4
    assert cases.loss_bytes("mio", b, k, 2, "fwd") == 2 * x
    assert cases.loss_bytes("mio", b, k, 2, "fwd", grad_in_forward=True) == 2 * x + 2 * g
    assert cases.loss_bytes("mio", b, k, 2, "bwd", grad_in_forward=True) == 2 * g + 2 * x
    assert cases.loss_bytes("minc", b, k, 2, "bwd") == 2 * x + 4 * k * k


def test_floor_takes_the_binding_bound():
    from benchmarks import floors

    fl = floors.floor(flops=2e12, nbytes=1e9, launches=2, matmul_tflops=100.0,
                      copy_gbps=1000.0, launch_ms=0.01)
    assert fl["flop_ms"] == pytest.approx(20.0) and fl["byte_ms"] == pytest.approx(1.0)
    assert fl["launch_ms"] == pytest.approx(0.02)
    assert fl["bound"] == "flop" and fl["ms"] == pytest.approx(20.0)
    tiny = floors.floor(flops=1e6, nbytes=1e4, launches=1, matmul_tflops=100.0,
                        copy_gbps=1000.0, launch_ms=0.01)
    assert tiny["bound"] == "launch" and tiny["ms"] == pytest.approx(0.01)
    none = floors.floor(1.0, 1.0, 1, None, None, None)
    assert none["ms"] is None and none["bound"] is None
    with pytest.raises(ValueError, match="mode"):
        floors.loss_flops("mio", None, 8, 4, "backward")


H200 = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "h200-2026-12-04-15384f2"


@pytest.mark.skipif(not (H200 / "results.json").exists(), reason="H200 results not in this tree")
def test_h200_report_has_floors_and_no_case_above_the_peak(tmp_path):
    """The committed H200 results, rebuilt by the current report: every measured case sits
    at or below its floor's speed and the matmul ceiling (the old flop model put the fused
    providers' bwd at up to 870 % of it), and the tables show the floors."""
    import shutil

    for name in ("results.json", "gpu_floor.json"):
        shutil.copy(H200 / name, tmp_path / name)
    assert report.main([str(tmp_path), "--no-plots", "--quiet"]) == 0
    data = _load(tmp_path)
    assert data["ceilings"]["launch"]["source"] == "gpu_floor.json"
    assert data["ceilings"]["custom_op"]["source"] == "gpu_floor.json"
    ok = [r for r in data["cases"] if r["status"] == "ok"]
    assert len(ok) == 723
    for r in ok:
        assert r["floor"]["ms"] > 0 and r["floor"]["bound"] in ("flop", "byte", "launch"), r
        assert 0 < r["frac_floor"] <= 1.0, r
        assert r["frac_matmul"] is None or r["frac_matmul"] <= 1.0, r
        if r["family"] == "minc_kernels" and r["mode"] == "bwd":
            assert r["flops"] == 0 and r["tflops"] is None
    md = (tmp_path / "results.md").read_text()
    assert "minc_kernels floor ms" in md and "% of floor" in md and "launch floor" in md
    # issue 21's targets, as the README quotes this run: none met but MIO's over compile
    assert "## Issue 21 targets" in md
    rows = {(r[0].split()[0] + r[0].split()[1], r[1]): r for r in report.target_rows(data)}
    assert rows[("geomean>=", "spectral")][2:] == ["NOT met", "0.486× over 24 cases"]
    assert rows[("geomean>=", "minc")][2:] == ["NOT met", "1.26× over 24 cases"]
    assert rows[("geomean>=", "mio")][2:] == ["met", "2.58× over 24 cases"]
    assert rows[("fwd+bwd<=", "spectral")][2:] == ["NOT met", "0/6 cases; slowest 1.840 ms at "
                                                   "B=1024, k=512"]
    assert [r[2] for r in rows.values()].count("met") == 1
    # report --ab: a run against itself, every case side by side at 1×
    ab = tmp_path / "ab.md"
    assert report.main(["--ab", str(tmp_path), str(tmp_path), "--labels", "A,B",
                        "--out", str(ab)]) == 0
    text = ab.read_text()
    assert "723 cases measured by both" in text
    row = next(ln for ln in text.splitlines()
               if ln.startswith("| mio | fwd+bwd | bf16 | minc_kernels |"))
    assert row.endswith("| 1× | 1× | 1× |"), row  # grid + the B = 32768 memory case


def test_targets_are_met_or_not_case_by_case():
    """report.target_rows on a made-up grid: a case slower than compile, a small case over
    0.25 ms, a big case under half the matmul ceiling each fail their target and are named
    as the worst; a case that did not run fails the small-shape target."""
    peak = 700.0  # TFLOP/s
    big_flops = floors.loss_flops("minc", None, 8192, 8192, "fwd+bwd", True)
    assert big_flops >= 50e9

    def grid(small_ms, big_frac, small_status="ok"):
        big_ms = big_flops / (big_frac * peak * 1e12) * 1e3
        rows = [("eager", 256, 128, 1.0), ("compile", 256, 128, 0.5),
                ("minc_kernels", 256, 128, small_ms), ("eager", 8192, 8192, 3 * big_ms),
                ("compile", 8192, 8192, 2 * big_ms), ("minc_kernels", 8192, 8192, big_ms)]
        data = dict(cases=[dict(loss="minc", family=f, provider=f, B=b, k=k, dtype="bf16",
                                mode="fwd+bwd", median_ms=ms,
                                status=small_status if (f, b) == ("minc_kernels", 256) else "ok")
                           for f, b, k, ms in rows],
                    ceilings={"matmul": {"bfloat16": {"tflops": peak}}})
        report.add_derived(data)
        return {r[0]: r[2:] for r in report.target_rows(data)}

    got = grid(small_ms=0.2, big_frac=0.8)
    assert [v[0] for v in got.values()] == ["met"] * 4, got
    got = grid(small_ms=0.6, big_frac=0.3)  # slower than compile's 0.5 ms; 30 % of the peak
    assert got[">= 1.0x the better of eager and compile, every case"] == [
        "NOT met", "1/2 cases; worst 0.833× at B=256, k=128"]
    assert got["geomean >= 1.5x torch.compile"][0] == "NOT met"
    assert got[">= 50% of the matmul ceiling at >= 50 GFLOP"] == [
        "NOT met", "0/1 cases; worst 30% at B=8192, k=8192"]
    assert got["fwd+bwd <= 0.25 ms at B <= 1024, k <= 512"] == [
        "NOT met", "0/1 cases; slowest 0.600 ms at B=256, k=128"]
    got = grid(small_ms=0.2, big_frac=0.8, small_status="error")  # did not run: not met
    assert got["fwd+bwd <= 0.25 ms at B <= 1024, k <= 512"] == ["NOT met", "0/1 cases"]


def test_ema_shapes_and_bytes():
    name, shapes = cases.byol_target_shapes("resnet50")
    n = sum(torch.Size(s).numel() for s in shapes)
    # ResNet-50 without fc (23.51 M) + projector 2048-4096(BN)-256 (9.45 M) + BN running stats.
    assert 32.9e6 < n < 33.1e6 and len(shapes) == 273, (n, len(shapes))
    assert cases.ema_bytes_per_param(torch.float32) == 12
    assert cases.ema_bytes_per_param(torch.bfloat16) == 10
    t, o = cases.ema_tensors(shapes[:3], torch.bfloat16, torch.device("cpu"))
    before = [x.clone() for x in t]
    cases.ema_fn("loop", t, o, 0.9)()
    for x, x0, y in zip(t, before, o):
        torch.testing.assert_close(x, 0.9 * x0 + 0.1 * y.float())


def test_measure_and_oom_detection():
    calls = []
    res = measure(lambda: calls.append(1), torch.device("cpu"),
                  Budget(warmup_ms=1, measure_ms=2, min_reps=3, max_reps=7))
    assert 3 <= res["reps"] <= 7 and res["median_ms"] >= 0
    assert len(calls) >= 1 + 2 + res["reps"]
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory."))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert run.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert run.slugify("CPU AMD EPYC (2 threads)") == "cpu-amd-epyc"


@pytest.mark.gpu
def test_runner_on_cuda(tmp_path):
    out = tmp_path / "res"
    run.main(["--out", str(out), "--B", "256,1024", "--k", "128", "--providers",
              "eager,minc_kernels", "--modes", "fwd+bwd", "--ema", "off", "--no-plots",
              "--no-progress", "--case-ms", "5", "--memory-case", "off"])
    data = _load(out)
    assert data["meta"]["device_type"] == "cuda" and data["settings"]["dtypes"] == ["bf16"]
    assert data["ceilings"]["copy"]["gbps"] > 100
    assert data["ceilings"]["matmul"]["bfloat16"]["tflops"] > 10
    for r in data["cases"]:
        if r["family"] == "eager":
            assert r["status"] == "ok" and r["peak_mb"] > 0, r
        elif _backend.op_status(cases.OP_NAME[r["loss"]])[0]:
            assert r["status"] == "ok", r["reason"]
            assert r["peak_mb"] is not None and r["speedup_vs_eager"] > 0


def test_gpu_check_script_runs_its_bench_step(tmp_path):
    """benchmarks/gpu_check.sh (the GPU visit's script) end to end, bench step only, tiny."""
    import os
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    env = dict(os.environ, PYTHON=sys.executable, STEPS="bench", TOTAL_S="300", PACK="0",
               BENCH_ARGS="--device cpu --B 8 --k 4 --providers eager --modes fwd --ema off "
                          "--no-ceilings --no-plots --case-ms 5")
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert "bench      rc=0" in (out / "steps.txt").read_text()
    data = _load(out)
    from minc_kernels.losses import REGISTRY

    assert {r["loss"] for r in data["cases"]} == set(REGISTRY)  # every registered loss
    assert all(r["status"] == "ok" for r in data["cases"])
    assert (out / "results.md").exists() and (out / "summary.txt").exists()
    # The summary is printed last, after the steps table.
    assert proc.stdout.index("bench      rc=0") < proc.stdout.index("== benchmark summary")


def test_cpu_overhead_benchmark_end_to_end(tmp_path, monkeypatch):
    """benchmarks/cpu_overhead.py (issue 13's targets) runs and writes consistent rows:
    every EMA case against its baseline, with paired per-round ratios."""
    from benchmarks import cpu_overhead

    monkeypatch.setattr(sys, "argv", ["cpu_overhead.py", "--rounds", "4", "--ema-rounds", "4",
                                      "--depths", "18", "--repeats", "2", "--out", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        cpu_overhead.main()
    finally:
        torch.set_num_threads(threads)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 2 and [r["case"] for r in runs[0]] == [r["case"] for r in runs[1]]
    cases_run = [r["case"].split(" ")[0] for r in runs[-1]]
    assert cases_run.count("MINCLoss") == 2 and cases_run.count("ema_update_") == 1
    assert cases_run.count("MomentumEncoder.update") == 2  # vs timm ModelEmaV3 and the lower bound
    for r in runs[-1]:
        ps = r["paired_speed"]
        assert ps["q1"] <= ps["median"] <= ps["q3"] and 0.0 <= ps["faster_share"] <= 1.0
        assert "_cpu_ms" not in r["library_ms"] and r["library_ms"]["median_ms"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "paired speed" in md and "## Every run" in md and "of 2 runs" in md


def test_cpu_host_overhead_stubs_launches_and_counts_them(tmp_path):
    """benchmarks/cpu_host_overhead.py: the real launchers run with every Triton launch
    replaced by a counter (restored afterwards), and each case records host time and
    launch counts; the MD table lists them."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from benchmarks import cpu_host_overhead as cho

    from minc_kernels.losses import REGISTRY

    with_kernels = [n for n, s in REGISTRY.items() if s.op]
    assert {"spectral", "minc", "mio"} <= set(with_kernels)
    before = (JITFunction.run, InterpretedFunction.run)
    threads = torch.get_num_threads()
    try:
        assert cho.main(["--out", str(tmp_path), "--shapes", "16x8",
                         "--repeats", "2", "--calls", "3", "--warmup", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (JITFunction.run, InterpretedFunction.run) == before
    data = json.loads((tmp_path / "results.json").read_text())
    recs = [r for r in data["cases"] if r["loss"] != "control"]
    assert {(r["loss"], r["path"], r["mode"]) for r in recs} == {
        (loss, path, mode) for loss in with_kernels for path in cho.PATHS for mode in cho.MODES}
    for r in recs:
        assert r["triton_launches"] == sum(r["triton_kernels"].values()) > 0, r
        assert r["launches"] == r["triton_launches"] + r["aten_kernel_ops"]
        assert r["aten_ops"] >= r["aten_kernel_ops"] >= 0
        assert len(r["rounds"]) == 2 and r["cpu_us"]["min"] <= r["cpu_us"]["median"] > 0
    # Every loss's ops form the gradient in the forward (what benchmarks.cases.grad_in_forward
    # and the flop model credit them with): backward launches no Triton kernel, only scales.
    by = {(r["loss"], r["path"], r["mode"]): r for r in recs}
    for loss in with_kernels:
        assert cases.grad_in_forward("minc_kernels", loss)
        for path in cho.PATHS:
            assert (by[(loss, path, "fwd+bwd")]["triton_kernels"]
                    == by[(loss, path, "fwd")]["triton_kernels"]), (loss, path)
    md = (tmp_path / "results.md").read_text()
    assert "| mio | functional | fwd+bwd | 16 | 8 |" in md and "thread CPU time" in md
    with pytest.raises(SystemExit):
        cho.parse_args(["--losses", "nope"])
    # A/B table of runs: the same run as A and B gives ratios of 1
    ab = tmp_path / "ab.md"
    assert cho.main(["--compare", str(ab), f"A={tmp_path}", f"B={tmp_path},{tmp_path}"]) == 0
    text = ab.read_text()
    assert "| mio | functional | fwd+bwd | 16 | 8 |" in text and "1.00×" in text
    assert cho.main(["--compare", str(ab), "A"]) == 2


def test_sync_check_steps_every_registry_loss(tmp_path):
    """benchmarks/sync_check.py (CPU dry run: no sync mode to check) steps each registry
    loss through its module, MINC against the target network's outputs."""
    from benchmarks import sync_check
    from minc_kernels.losses import REGISTRY

    assert sync_check.main(["--device", "cpu", "--B", "8", "--k", "4", "--dtype", "fp32",
                            "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sync_check.json").read_text())["results"]
    assert [r["loss"] for r in res] == list(REGISTRY)
    assert all(r["status"] == "ok" and math.isfinite(r["loss_value"]) for r in res), res
    with pytest.raises(SystemExit):
        sync_check.main(["--device", "cpu", "--losses", "nope"])


def test_op_memory_measures_allocations_with_launches_stubbed(tmp_path):
    """benchmarks/op_memory.py: the calibration allocation is measured to within a few MiB;
    the stubbed launchers' allocations show the k×k matrix of the Gram path (16 MiB at
    k = 2048, fp32), and on the N×N path at most four fp32 (N, k) buffers (2 MiB each) at
    the peak: the standardised views and the gradients (written in place by the Jacobian
    pass), then in backward the saved gradients and the returned ones (no zero tensors for
    the op's gradient outputs)."""
    from benchmarks import op_memory

    assert op_memory.main(["--losses", "barlow_twins", "--shapes", "256x2048", "--dtypes", "fp32",
                           "--providers", "minc_kernels-gram,minc_kernels-pairwise",
                           "--threads", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    by = {r["provider"]: r for r in data["cases"]}
    assert set(by) == {"probe", "minc_kernels-gram", "minc_kernels-pairwise"}
    assert all(r["status"] == "ok" for r in by.values()), by
    # about 1 MiB low at worst: file-backed pages reclaimed during the call (op_memory's docstring)
    assert op_memory.PROBE_MIB - 1 <= by["probe"]["peak_mib"] < op_memory.PROBE_MIB + 8
    assert by["probe"]["mmap_threshold_fixed"] is True
    gram, pairwise = by["minc_kernels-gram"], by["minc_kernels-pairwise"]
    assert gram["launches"]["cross_gram_kernel"] == 1 and "cross_gram_kernel" not in pairwise["launches"]
    assert gram["peak_mib"] >= 16.0
    assert pairwise["peak_mib"] <= 4 * 2.0 + 1.0
    assert "| barlow_twins | 256 × 2048 | fp32 | minc_kernels-gram |" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        op_memory.parse_args(["--shapes", "1x8"])


def test_gram_precision_emulation_is_the_op(tmp_path):
    """benchmarks.gram_precision: its float64 emulation of the bf16 gram path gives the
    same gradient errors as the Triton op (interpreted), the rounded Grams stay within
    eager's error, and the tables are written."""
    from benchmarks import gram_precision
    gram_precision.main(["--out", str(tmp_path), "--shapes", "40x7", "--op-max", "1000",
                         "--kxk-shapes", "24x10"])
    data = json.loads((tmp_path / "results.json").read_text())
    for r in data["kxk_rows"]:  # Barlow Twins rounds Γ, VICReg does not
        e = r["errors"]
        same = e["op"] == e["op, fp32 operand"]
        assert same == (r["loss"] == "vicreg"), r
        assert max(e["op"]["dz1"], e["op"]["dz2"]) <= 3 * max(e["eager"]["dz1"], e["eager"]["dz2"])
    assert [r["regime"] for r in data["rows"]] == list(gram_precision.REGIMES)
    for r in data["rows"]:
        e = r["errors"]
        for key in ("dz1", "dz2"):
            assert e["op"][key] == pytest.approx(e["bf16-G"][key], rel=1e-6)
            assert e["bf16-G"][key] <= 3 * e["eager-pairwise"][key]
        assert e["op"]["loss"] <= e["eager-pairwise"]["loss"]
    assert "bf16-G dz / eager-pairwise dz" in (tmp_path / "results.md").read_text()
