"""CPU dry run of benchmarks/gpu_check.sh (the GPU visit's script): its steps run in order,
each writes its output file, and the setuptools check stops a build that would fail.
(The bench step's dry run is in tests/test_benchmarks.py.)"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path, **env):
    full = dict(os.environ, PYTHON=sys.executable, TOTAL_S="300", **env)
    full.pop("TRITON_INTERPRET", None)  # the script's own pytest sets it (conftest)
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=full,
                          capture_output=True, text=True, timeout=280)


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_gpu_tests_then_sync_check_in_order(tmp_path):
    proc = _run(tmp_path, STEPS="setup,gputests,sync",
                SYNC_ARGS="--B 8 --k 4 --losses minc,spectral")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    lines = (out / "steps.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["setup", "gputests", "sync"], lines
    assert all(" rc=0 " in ln for ln in lines), lines
    assert "pyproject needs >=" in (out / "setup.txt").read_text()
    # -m gpu ran the ops and extension test files (skipped here: no CUDA)
    gpu_log = (out / "pytest_gpu.txt").read_text()
    assert "test_ops_mio.py" in gpu_log or "skipped" in gpu_log
    assert (out / "sync_check.json").exists()
    assert "2/2 steps without a host sync" in (out / "sync_check.txt").read_text()
    assert proc.stdout.index("=== [") < proc.stdout.index("summary")


def test_too_old_setuptools_skips_the_build(tmp_path):
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[build-system]\nrequires = ["setuptools>=999", "wheel"]\n\n[project]\n')
    proc = _run(tmp_path, STEPS="setup,build", PYPROJECT=str(fake))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert "TOO OLD" in (out / "setup.txt").read_text()
    steps = (out / "steps.txt").read_text()
    assert "setup      rc=1" in steps and "build      rc=skip" in steps
    assert not (out / "build.log").exists()
