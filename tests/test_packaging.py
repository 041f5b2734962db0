"""The library is the library: ``import minc_kernels`` loads torch and nothing of the
training program, and the package metadata asks for torch only (issue 16)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules of the application stack: training program, plotting, progress bars, images.
APPLICATION = {"minc_train", "torchvision", "matplotlib", "tqdm", "numpy", "PIL", "pandas", "scipy"}


def _top_level_modules(code: str) -> set[str]:
    """Top-level names in sys.modules after running ``code`` in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_import_loads_no_application_module():
    # torch itself may import numpy and tqdm (torch.hub does when they are installed):
    # what counts is what minc_kernels adds on top of ``import torch``.
    torch_only = _top_level_modules("import torch")
    lib = _top_level_modules("import minc_kernels")
    added = lib - torch_only
    assert not added & APPLICATION, sorted(added & APPLICATION)
    # the training program, plotting and image stacks are not loaded at all
    assert not lib & {"minc_train", "torchvision", "matplotlib", "PIL"}


def test_training_program_is_not_in_the_library():
    import importlib.util
    assert importlib.util.find_spec("minc_kernels.train") is None
    assert not os.path.exists(os.path.join(ROOT, "minc_kernels", "train"))


def _pyproject(path):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(path, "rb") as f:
        return tomllib.load(f)


def test_core_depends_on_torch_only_without_upper_cap():
    project = _pyproject(os.path.join(ROOT, "pyproject.toml"))["project"]
    deps = project["dependencies"]
    assert len(deps) == 1 and deps[0].replace(" ", "").startswith("torch>="), deps
    assert "<" not in deps[0] and "==" not in deps[0], deps  # no cap: newer torch installs
    assert "scripts" not in project  # minc-train belongs to the example package
    # the SPDX string form needs setuptools>=77; a fresh Python 3.11 venv has 65.5
    assert isinstance(project["license"], dict), project["license"]


def test_example_package_provides_minc_train():
    project = _pyproject(os.path.join(ROOT, "examples", "pyproject.toml"))["project"]
    assert project["scripts"] == {"minc-train": "minc_train.cli:main"}
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert {"minc_kernels", "torch", "torchvision", "tqdm", "numpy", "matplotlib"} <= deps
