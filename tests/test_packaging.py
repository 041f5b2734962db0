"""The library is the library: ``import minc_kernels`` loads torch and nothing of the
training program, and the package metadata asks for torch only (issue 16).  What a
newcomer downloads is complete: the license text, and an sdist whose tests collect."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

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


def _setuptools_floor(requires: list[str]) -> tuple[int, ...]:
    (spec,) = [r.replace(" ", "") for r in requires if r.replace(" ", "").startswith("setuptools")]
    assert spec.startswith("setuptools>="), spec
    return tuple(int(x) for x in spec.split(">=", 1)[1].split("."))


def test_core_depends_on_torch_only_without_upper_cap():
    meta = _pyproject(os.path.join(ROOT, "pyproject.toml"))
    project = meta["project"]
    deps = project["dependencies"]
    assert len(deps) == 1 and deps[0].replace(" ", "").startswith("torch>="), deps
    assert "<" not in deps[0] and "==" not in deps[0], deps  # no cap: newer torch installs
    assert "scripts" not in project  # minc-train belongs to the example package


def test_license_is_declared_in_spdx_form_and_shipped():
    meta = _pyproject(os.path.join(ROOT, "pyproject.toml"))
    project = meta["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    # PEP 639's string form and license-files need setuptools>=77 at build time
    assert _setuptools_floor(meta["build-system"]["requires"]) >= (77,)
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_make_setup_installs_a_setuptools_that_reads_the_metadata():
    # `make setup` builds with --no-build-isolation, so the venv's own setuptools reads
    # pyproject.toml: it must install at least the build-system floor.
    path = os.path.join(ROOT, "Makefile")
    if not os.path.exists(path):
        pytest.skip("no Makefile (an unpacked sdist)")
    floor = _setuptools_floor(_pyproject(os.path.join(ROOT, "pyproject.toml"))
                              ["build-system"]["requires"])
    with open(path) as f:
        makefile = f.read()
    want = '"setuptools>=' + ".".join(map(str, floor)) + '"'
    assert want in makefile, f"Makefile should install {want} before the --no-build-isolation build"


def test_example_package_provides_minc_train():
    path = os.path.join(ROOT, "examples", "pyproject.toml")
    if not os.path.exists(path):
        pytest.skip("the training program is not part of the library's sdist")
    project = _pyproject(path)["project"]
    assert project["scripts"] == {"minc-train": "minc_train.cli:main"}
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert {"minc_kernels", "torch", "torchvision", "tqdm", "numpy", "matplotlib"} <= deps


def _build(hook: str, src: str, out: str, env_extra: dict | None = None) -> str:
    """Runs a PEP 517 hook of setuptools in a fresh interpreter in ``src``; returns the file name."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from setuptools import build_meta as b\n"
                        f"print(b.{hook}(sys.argv[1]))", out],
                       cwd=src, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_sdist_carries_its_tests_docs_and_license_and_its_tests_collect(tmp_path):
    """The sdist holds what its tests need (conftest, docs, the benchmark harness, LICENSE)
    and not the committed results; ``pytest --collect-only`` in it finds no error; the wheel
    built from it (pure Python here: MINC_KERNELS_BUILD=none, to stay fast) carries LICENSE."""
    # Build from a clean copy of the checkout (tracked and new, not ignored, files): an
    # egg-info left in the working tree would feed its old file list into the sdist.
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout (an unpacked sdist)")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    clean = tmp_path / "checkout"
    for rel in filter(None, listed):
        if os.path.isfile(os.path.join(ROOT, rel)):  # deleted-but-tracked files are skipped
            (clean / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), clean / rel)
    dist = tmp_path / "dist"
    name = _build("build_sdist", str(clean), str(dist))
    with tarfile.open(dist / name) as tar:
        members = tar.getnames()
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    top = members[0].split("/")[0]
    files = {m.split("/", 1)[1] for m in members if "/" in m}
    need = {"LICENSE", "tests/conftest.py", "tests/test_packaging.py", "docs/math.md",
            "pyproject.toml", "setup.py", "csrc/ema.cpp", "benchmarks/__init__.py",
            "benchmarks/static_sm90.py", "benchmarks/gpu_check.sh"}
    assert need <= files, sorted(need - files)
    assert not any(f.startswith("benchmarks/results/") for f in files)
    assert not any(f.endswith((".so", ".pyc")) for f in files)
    src = tmp_path / top

    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                        "no:cacheprovider", "tests"], cwd=src, capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items()
                                         if k != "PYTEST_ADDOPTS"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "error" not in r.stdout.splitlines()[-1], r.stdout.splitlines()[-1]

    wheel = _build("build_wheel", str(src), str(tmp_path / "wheel"),
                   {"MINC_KERNELS_BUILD": "none"})
    with zipfile.ZipFile(tmp_path / "wheel" / wheel) as whl:
        names = whl.namelist()
        # the measured decision tables travel with the package (their folder's README now;
        # tables/*.json once a GPU calibration is committed)
        assert {"minc_kernels/tables/README.md", "minc_kernels/ops/tables.py"} <= set(names)
        (lic,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert b"Apache License" in whl.read(lic)
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "License-Expression: Apache-2.0" in whl.read(meta).decode()
