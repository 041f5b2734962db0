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
