"""CPU dry run of benchmarks/gpu_check.sh (the GPU visit's script): its steps run in order,
each writes its output file, a crashing GPU test file does not end the GPU test step, an
extension that did not build is reported loudly, the train step runs the installed
application, and everything is packed into a few files.
(The bench step's dry run is in tests/test_benchmarks.py.)"""
import io
import json
import os
import subprocess
import sys
import tarfile
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TINY_TRAIN = "--device cpu --tiny --steps 1 --warmup 1 --methods mio --batch 8 --image-size 16"


def _run(tmp_path, **env):
    full = dict(os.environ, PYTHON=sys.executable, TOTAL_S="300", PACK="0")
    full.update(env)
    full.pop("TRITON_INTERPRET", None)  # the script's own pytest sets it (conftest)
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=full,
                          capture_output=True, text=True, timeout=280)


def _steps(out: Path) -> dict[str, str]:
    return {ln.split()[0]: ln for ln in (out / "steps.txt").read_text().splitlines()}


def _gpu_test_file(folder: Path, name: str, body: str) -> Path:
    path = folder / f"test_{name}.py"
    path.write_text("import os, signal\nimport pytest\n\n\n@pytest.mark.gpu\n"
                    f"def test_{name}():\n    {body}\n")
    return path


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_a_crashing_test_file_does_not_end_the_gpu_tests_then_sync_train_pack(tmp_path):
    """One pytest process per file: a segfault in the first file (what ended the H200 run's
    GPU tests) is recorded as its own rc=139 and the next file, the sync check and the
    train step still run; PACK=1 leaves the archive, the summary and the steps table."""
    tests = tmp_path / "t"
    tests.mkdir()
    crash = _gpu_test_file(tests, "crash", "os.kill(os.getpid(), signal.SIGSEGV)")
    fine = _gpu_test_file(tests, "fine", "assert True")
    proc = _run(tmp_path, STEPS="setup,gputests,sync,train", PACK="1",
                GPU_TEST_FILES=f"{crash} {fine}", SYNC_ARGS="--B 8 --k 4 --losses spectral",
                TRAIN_ARGS=TINY_TRAIN)
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stdout[-3000:]  # a step failed: the crash
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "steps.txt",
                                                     "summary.txt"]
    steps = _steps(out)
    assert list(steps) == ["setup", "gpu:test_crash", "gpu:test_fine", "sync", "train"], steps
    assert " rc=139 " in steps["gpu:test_crash"] and "SIGSEGV" in steps["gpu:test_crash"]
    # (the sync step ran after the crash; whether it passes is benchmarks.sync_check's test)
    for name in ("setup", "gpu:test_fine", "train"):
        assert " rc=0 " in steps[name], steps[name]
    assert "1 passed" in steps["gpu:test_fine"]
    summary = (out / "summary.txt").read_text()
    assert "failed steps: gpu:test_crash" in summary
    assert "train step:" in summary and "mio: eager" in summary
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        log = tar.extractfile("./pytest_gpu.txt").read().decode()
    assert {"setup.txt", "machine.txt", "pytest_gpu.txt", "sync_check.txt",
            "train_step.json", "train_step.txt", "steps.txt", "summary.txt"} <= names
    assert f"{crash}: rc=139 (SIGSEGV)" in log and f"{fine}: rc=0" in log
    assert proc.stdout.index("=== [") < proc.stdout.index("summary")


def test_gpu_test_files_are_discovered_ops_first(tmp_path):
    """Without GPU_TEST_FILES, every tests/ file holding GPU tests gets its own process, the
    ops and extension files first (here the budget is too short to run any: each is
    recorded as skipped, which lists them without paying for the runs)."""
    proc = _run(tmp_path, STEPS="gputests", GPU_TEST_TIMEOUT_S="5")
    assert proc.returncode == 0, proc.stdout[-3000:]
    names = [n for n in _steps(tmp_path / "out") if n.startswith("gpu:")]
    def marks_gpu(path: Path) -> bool:  # mark.gpu in the code, not inside a string
        toks = [t.string for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                if t.type in (tokenize.NAME, tokenize.OP)]
        return any(toks[i:i + 3] == ["mark", ".", "gpu"] for i in range(len(toks) - 2))

    expect = sorted(p.stem for p in (ROOT / "tests").glob("test_*.py") if marks_gpu(p))
    assert {"test_ops_mio", "test_ema_ext", "test_sync_free"} <= set(expect)
    assert sorted(n[4:] for n in names) == expect
    first_other = next(i for i, n in enumerate(names)
                       if not n.startswith(("gpu:test_ops_", "gpu:test_ema_ext")))
    assert all(n.startswith(("gpu:test_ops_", "gpu:test_ema_ext")) for n in names[:first_other])
    assert "gpu:test_ops_mio" in names[:first_other]
    assert names[0].startswith("gpu:test_ops_")  # the kernels' own tests first
    assert "gpu:test_gpu_check" not in names  # its "@pytest.mark.gpu" is inside a string


def test_extension_that_did_not_build_fails_loudly(tmp_path):
    """import minc_kernels._C fails (simulated by an import hook): the ext step fails, a
    banner says so, the summary starts with it and the script exits 1."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'minc_kernels._C':\n"
        "            raise ImportError('simulated: the extension was not built')\n"
        "sys.meta_path.insert(0, _Block())\n")
    proc = _run(tmp_path, STEPS="ext", PYTHONPATH=str(hook))
    out = tmp_path / "out"
    assert proc.returncode == 1
    assert "THE EXTENSION DID NOT BUILD OR LOAD" in proc.stdout
    assert " rc=3 " in _steps(out)["ext"]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("!!!!!!!! THE EXTENSION DID NOT BUILD OR LOAD")
    assert "EXTENSION NOT BUILT" in summary[0] and "simulated" in summary[0]


def test_too_old_setuptools_skips_the_build(tmp_path):
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[build-system]\nrequires = ["setuptools>=999", "wheel"]\n\n[project]\n')
    proc = _run(tmp_path, STEPS="setup,build", PYPROJECT=str(fake))
    assert proc.returncode == 1  # the setup step failed
    out = tmp_path / "out"
    assert "TOO OLD" in (out / "setup.txt").read_text()
    steps = (out / "steps.txt").read_text()
    assert "setup      rc=1" in steps and "build      rc=skip" in steps
    assert not (out / "build.log").exists()
    assert "failed steps: setup" in (out / "summary.txt").read_text()


@pytest.mark.parametrize("step,prefix,labels,dtype", [
    ("gramab", "gram", ("triton", "cublas"), "fp32"),  # MINC_KERNELS_GRAM
    ("splitab", "split", ("never", "always"), "bf16"),  # MINC_KERNELS_ROWMAT_SPLIT
    ("wideab", "wide", ("triton", "triton_wide"), "bf16"),  # MINC_KERNELS_GRAM
    ("orderab", "order", ("launch", "grouped"), "bf16"),  # MINC_KERNELS_TILE_ORDER
])
def test_env_ab_steps_measure_both_settings(tmp_path, step, prefix, labels, dtype):
    """The opt-in A/B steps (one helper, env_ab): the runner twice, once per setting of the
    switch (here on the CPU under the interpreter, tiny), and the side-by-side table of the
    common cases."""
    args = f"--device cpu --B 8 --k 4 --interpret --losses minc --dtype {dtype} --case-ms 5"
    proc = _run(tmp_path, STEPS=step, **{f"{step.upper()}_ARGS": args})
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " rc=0 " in _steps(out)[step]
    ab = (out / f"{prefix}_ab.md").read_text()
    assert f"# A/B: {labels[0]} vs {labels[1]}" in ab
    assert f"| minc | fwd+bwd | {dtype} | minc_kernels | 8 | 4 |" in ab
    for label in labels:
        recs = json.loads((out / f"{prefix}-{label}" / "results.json").read_text())["cases"]
        assert [r["provider"] for r in recs] == ["minc_kernels"] and recs[0]["status"] == "ok"


def test_calibrate_step_writes_the_table_and_the_later_steps_use_it(tmp_path):
    """The calibrate step (here a CPU dry run under the interpreter) writes calibration/
    table.json and calibration.md, the summary quotes the decisions, and PACK=1 keeps both
    files loose beside the archive."""
    proc = _run(tmp_path, STEPS="calibrate", PACK="1",
                CALIBRATE_ARGS="--interpret --rows 8 --cols 8 --dtype fp32 "
                               "--decisions gram.gram --case-ms 1")
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " rc=0 " in _steps(out)["calibrate"]
    table = json.loads((out / "calibration" / "table.json").read_text())
    assert table["family"] == "interpret" and list(table["decisions"]) == ["gram.gram/fp32"]
    summary = (out / "summary.txt").read_text()
    assert "## `gram.gram/fp32`: triton vs cublas" in summary
    assert sorted(p.name for p in out.iterdir()) == ["calibration", "gpu_check.tar.gz",
                                                     "steps.txt", "summary.txt"]
    assert sorted(p.name for p in (out / "calibration").iterdir()) == ["calibration.md",
                                                                      "table.json"]
    # the script exported the fresh table for the steps after it
    assert "MINC_KERNELS_TABLE set" in _steps(out)["calibrate"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        assert "./calibrate.log" in tar.getnames()


def test_bench_environment_names_the_decision_table(monkeypatch, tmp_path):
    import torch

    from benchmarks.run import decision_table
    monkeypatch.setenv("MINC_KERNELS_TABLE", str(tmp_path / "t.json"))
    got = decision_table(torch.device("cpu"))
    assert got == {"decision_table_env": str(tmp_path / "t.json"), "decision_table": None}
