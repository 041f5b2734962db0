"""Builds the optional C++/CUDA extension ``minc_kernels._C``; metadata is in pyproject.toml.

The extension is built only when torch is importable in the build environment
(``pip install --no-build-isolation .``).  Without torch, or if the build fails
and ``MINC_KERNELS_BUILD_EXT`` is not ``1``, the package installs as pure Python
and ``ema_update_`` falls back to ``torch._foreach_lerp_``.

Environment:
    MINC_KERNELS_BUILD       auto (default: CUDA + C++ when a CUDA toolkit and a CUDA
                             build of torch are found, else C++ only) | cuda | cpu | none
    MINC_KERNELS_BUILD_EXT   1: a failed (or impossible) build is an error instead of a
                             warning followed by a pure-Python install
    TORCH_CUDA_ARCH_LIST     GPU architectures to compile for (default "9.0": Hopper)
    CUDA_HOME                the toolkit (else nvcc on PATH, else /usr/local/cuda)
    MAX_JOBS                 parallel compile jobs (ninja)
"""
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
MODES = ("auto", "cuda", "cpu", "none")
BUILD_INFO_FILE = "_C_build.json"  # next to the built module; read by minc_kernels/_ext.py


def _say(msg: str) -> None:
    print(f"minc_kernels setup: {msg}", file=sys.stderr, flush=True)


def _strict() -> bool:
    return os.environ.get("MINC_KERNELS_BUILD_EXT", "").strip() == "1"


def _skip(reason: str) -> dict:
    if _strict():
        raise RuntimeError(f"MINC_KERNELS_BUILD_EXT=1 but the extension cannot be built: {reason}")
    _say(f"WARNING: not building the C++/CUDA extension ({reason}); installing pure Python "
         "(EMA updates use torch._foreach_lerp_)")
    return {}


def _pip_cuda_include_dirs(cuda_home: str) -> list:
    """Headers missing from a slim toolkit (cusparse.h, cublas_v2.h, ...) that the pip
    ``nvidia-*`` wheels of a CUDA torch carry (site-packages/nvidia/cu13/include, ...)."""
    if (Path(cuda_home) / "include" / "cusparse.h").exists():
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    found = []
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13/include", "cu12/include", "cusparse/include", "cublas/include"):
            if (Path(root) / sub).is_dir():
                found.append(str(Path(root) / sub))
    return found


def _set_cuda_home() -> None:
    """torch finds the toolkit from CUDA_HOME, else nvcc on PATH; an nvcc on PATH that is a
    wrapper script (/usr/local/bin/nvcc) would give a wrong home, so pick a real one here."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.path.realpath(nvcc)).parent.parent] if nvcc else []
    for home in candidates + [Path("/usr/local/cuda")]:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


def _extension_kwargs() -> dict:
    mode = os.environ.get("MINC_KERNELS_BUILD", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise SystemExit(f"MINC_KERNELS_BUILD must be one of {'|'.join(MODES)}, got {mode!r}")
    if mode == "none":
        return _skip("MINC_KERNELS_BUILD=none")
    _set_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any failure means: no torch to build against
        return _skip(f"torch is not importable in the build environment ({type(exc).__name__}: "
                     f"{exc}); install torch first and use pip install --no-build-isolation")

    cuda_home = cpp_extension.CUDA_HOME
    nvcc = Path(cuda_home or "/nonexistent") / "bin" / "nvcc"
    cuda_why_not = None
    if not (torch.version.cuda and not getattr(torch.version, "hip", None)):
        cuda_why_not = f"torch {torch.__version__} is not a CUDA build"
    elif not nvcc.exists():
        cuda_why_not = f"no nvcc found (CUDA_HOME={cuda_home!r})"
    if mode == "cuda" and cuda_why_not:
        return _skip(f"MINC_KERNELS_BUILD=cuda but {cuda_why_not}")
    with_cuda = mode != "cpu" and cuda_why_not is None
    if mode == "auto" and cuda_why_not:
        _say(f"building the C++ (CPU) extension only: {cuda_why_not}")

    arch_list = ""
    if with_cuda:
        arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

    # Versions this build is made against, compiled in (build_info()) and written next to
    # the module (checked by _ext.load() before importing it).
    gen = HERE / "build" / "minc_generated"
    gen.mkdir(parents=True, exist_ok=True)
    torch_cuda = torch.version.cuda if with_cuda else ""
    header = ("#pragma once\n"
              f"#define MINC_BUILD_TORCH_VERSION {json.dumps(torch.__version__)}\n"
              f"#define MINC_BUILD_TORCH_CUDA {json.dumps(torch_cuda or '')}\n"
              f"#define MINC_BUILD_CUDA_ARCH_LIST {json.dumps(arch_list)}\n")
    path = gen / "minc_build_config.h"
    if not path.exists() or path.read_text() != header:  # unchanged: no needless rebuild
        path.write_text(header)
    build_record = {"torch": torch.__version__, "torch_cuda": torch_cuda or None,
                    "cuda_compiled": with_cuda, "cuda_arch_list": arch_list or None}

    include_dirs = [str(HERE / "csrc"), str(gen)]
    cxx = ["-O3", "-fopenmp"]
    if with_cuda:
        cxx.append("-DMINC_WITH_CUDA")
        # -isystem: searched after the toolkit's own include dir, so these never shadow it.
        nvcc_flags = ["-O3", "-lineinfo", "-DMINC_WITH_CUDA"]
        for d in _pip_cuda_include_dirs(cuda_home):
            nvcc_flags += ["-isystem", d]
        ext = cpp_extension.CUDAExtension(
            "minc_kernels._C", ["csrc/ema.cpp", "csrc/ema_cuda.cu"], include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "minc_kernels._C", ["csrc/ema.cpp"], include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    _say(f"building minc_kernels._C ({'CUDA + C++, TORCH_CUDA_ARCH_LIST=' + arch_list if with_cuda else 'C++ only'}) "
         f"against torch {torch.__version__}")

    class BuildExt(cpp_extension.BuildExtension):
        """A failed build removes its stale outputs and, unless strict, installs pure Python."""

        def run(self):
            inplace = self.inplace
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - compiler/linker/ninja errors of any type
                for self.inplace in {False, bool(inplace)}:  # build_lib and source tree
                    for e in self.extensions:
                        so = Path(self.get_ext_fullpath(e.name))
                        so.unlink(missing_ok=True)
                        so.with_name(BUILD_INFO_FILE).unlink(missing_ok=True)
                self.inplace = inplace
                if _strict():
                    raise
                _say(f"WARNING: building the C++/CUDA extension failed ({type(exc).__name__}: "
                     f"{exc}); installing pure Python (EMA updates use torch._foreach_lerp_). "
                     "Set MINC_KERNELS_BUILD_EXT=1 to make this an error.")
                self.extensions = []

        def _write_build_record(self, ext):
            out = Path(self.get_ext_fullpath(ext.name)).with_name(BUILD_INFO_FILE)
            out.write_text(json.dumps(build_record, indent=1) + "\n")

        def build_extension(self, ext):
            super().build_extension(ext)
            self._write_build_record(ext)  # into build_lib: a wheel carries it

        def copy_extensions_to_source(self):  # --inplace / editable installs
            super().copy_extensions_to_source()
            for ext in self.extensions:
                self._write_build_record(ext)

    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
