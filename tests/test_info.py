"""``python -m minc_kernels.info`` says what ``backend="auto"`` actually runs (issue 16)."""
import subprocess
import sys

import pytest
import torch

from minc_kernels import _backend, info
from minc_kernels.losses import REGISTRY


def test_interpreter_on_cpu_is_not_reported_as_live_kernels():
    pytest.importorskip("triton")
    for name in (n for n, s in REGISTRY.items() if s.op is not None):
        line = info.loss_backend_status(name, cuda=False, interpret=True)
        assert "live" not in line and line.startswith(info.fallback_name(name) + " under auto"), line
        # and auto really does run the fallback (no Triton op) for CPU tensors there
        assert _backend.select("auto", name, torch.randn(3, 2)) is None
    assert info.fallback_name("mio").startswith("blocked")
    assert "live" in info.loss_backend_status("minc", cuda=True, interpret=False)


def test_missing_kernels_are_reported_with_the_reason(monkeypatch):
    monkeypatch.setitem(_backend._ops_cache, "mio", ImportError("no triton here"))
    assert "no triton here" in info.loss_backend_status("mio", cuda=True, interpret=False)


def test_info_module_runs():
    env = {"TRITON_INTERPRET": "1", "PATH": ""}
    r = subprocess.run([sys.executable, "-m", "minc_kernels.info"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "loss_backends" in r.stdout
    if not torch.cuda.is_available():
        assert "triton kernels live" not in r.stdout


# ------------------------------------------------------------------ the compiled extension
_HIDE_EXTENSION = """
import importlib.abc, runpy, sys
class _NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "minc_kernels._C":
            raise ModuleNotFoundError("No module named 'minc_kernels._C'", name=name)
sys.meta_path.insert(0, _NoExtension())
runpy.run_module("minc_kernels.info", run_name="__main__")
"""


def test_info_says_plainly_when_the_extension_was_not_built():
    """A pure-Python install (no minc_kernels._C): info says so and prints the one command
    that builds the extension for this interpreter."""
    r = subprocess.run([sys.executable, "-c", _HIDE_EXTENSION], capture_output=True, text=True,
                       timeout=300, env={"PATH": ""})
    assert r.returncode == 0, r.stderr
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip()
             for line in r.stdout.splitlines() if ":" in line and not line.startswith(" ")}
    assert lines["ema_backend"].startswith("torch._foreach_lerp_: the C++/CUDA extension "
                                           "minc_kernels._C was not built"), lines["ema_backend"]
    cmd = lines["build_extension"]
    assert cmd.startswith(f"MINC_KERNELS_BUILD_EXT=1 {sys.executable} -m pip install "
                          "--no-build-isolation"), cmd
    if info.source_root() is not None:  # a checkout: the editable install of that checkout
        assert cmd.endswith(f" -e {info.source_root()}"), cmd


def test_build_command_names_the_checkout_or_asks_for_the_source():
    assert (info.format_build_command("/src/minc", "/venv/bin/python") ==
            "MINC_KERNELS_BUILD_EXT=1 /venv/bin/python -m pip install --no-build-isolation -e /src/minc")
    # installed from an sdist or a copy: no checkout to point at
    assert (info.format_build_command(None, "python") ==
            "MINC_KERNELS_BUILD_EXT=1 python -m pip install --no-build-isolation "
            "<the minc_kernels source directory or sdist>")


def test_extension_reasons_are_told_apart():
    from minc_kernels._ext import ExtensionMismatchError

    missing = info.extension_missing(ImportError("cannot import name '_C'"), file_exists=False)
    assert "was not built" in missing and missing.startswith("torch._foreach_lerp_")
    other = info.extension_missing(ExtensionMismatchError("built against torch 2.11.0"), True)
    assert "built for another torch" in other and "2.11.0" in other
    broken = info.extension_missing(ImportError("undefined symbol: foo"), True)
    assert "does not load" in broken and "undefined symbol: foo" in broken


def test_loaded_extension_prints_no_build_command():
    from minc_kernels import _ext

    ok, _ = _ext.status()
    out = info.collect()
    assert ("build_extension" in out) is (not ok)
    if ok:
        assert out["ema_backend"].startswith("compiled extension")
