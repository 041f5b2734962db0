"""The tree keeps the shape docs/../DESIGN promises (issue 24): one registry of losses that
the package exports, results folders that hold data only, no sys.path edits."""
import re
import subprocess
from pathlib import Path

import pytest

import minc_kernels as mk
from minc_kernels import functional, reference
from minc_kernels.losses import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def test_every_registered_loss_is_exported_with_its_functional_form():
    for name, spec in REGISTRY.items():
        assert getattr(mk, spec.module.__name__) is spec.module, name
        assert getattr(mk, spec.functional.__name__) is spec.functional, name
        assert getattr(functional, spec.functional.__name__) is spec.functional, name
        assert spec.module.__module__ == f"minc_kernels.losses.{name}", name  # one home
        assert spec.reference.__module__ in (f"minc_kernels.losses.{name}",), name
    assert set(mk.__all__) >= {s.module.__name__ for s in REGISTRY.values()}
    assert callable(reference.spectral_loss) and callable(reference.mio_loss)


def _tracked(*folders):
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    out = subprocess.run(["git", "ls-files", *folders], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def test_results_folders_hold_data_only():
    code = [f for f in _tracked("benchmarks/results", "examples/results")
            if f.endswith((".py", ".sh", ".ipynb"))]
    assert not code, code


def test_no_sys_path_edits():
    hits = []
    for f in _tracked("minc_kernels", "tests", "benchmarks", "examples"):
        if f.endswith(".py") and re.search(r"sys\.path\.(insert|append)\(",
                                           (ROOT / f).read_text(errors="replace")):
            hits.append(f)
    assert hits == [], hits
