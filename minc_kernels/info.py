"""``python -m minc_kernels.info``: versions, device, and which backends are live (and why not)."""
from __future__ import annotations

import os
import platform
import sys


def fallback_name(name: str) -> str:
    """What ``backend="auto"`` runs for loss ``name`` where the Triton kernels do not run
    (its registry entry's ``cpu_fallback``: MIO's blocked op, the reference elsewhere)."""
    from .losses import REGISTRY

    return REGISTRY[name].cpu_fallback


def loss_backend_status(name: str, cuda: bool, interpret: bool) -> str:
    """What ``backend="auto"`` runs for op ``name`` here, and what ``"triton"`` would."""
    from . import _backend
    from .losses import REGISTRY

    fallback = fallback_name(name)
    ok, why = _backend.op_status(REGISTRY[name].op)
    if not ok:
        return f"{fallback} only (Triton kernels unavailable: {why})"
    if cuda:
        return (f"triton kernels live for CUDA float32/bfloat16/float16 tensors (auto); "
                f"{fallback} otherwise")
    if interpret:
        return (f"{fallback} under auto (no CUDA device); backend='triton' runs the kernels "
                "through Triton's CPU interpreter (TRITON_INTERPRET=1, slow: for tests)")
    return (f"{fallback} (no CUDA device); kernels importable, backend='triton' with "
            "TRITON_INTERPRET=1 runs them on the CPU")


def collect() -> dict:
    import torch

    from . import __version__, _backend, _ext
    from .losses import REGISTRY

    info: dict = {
        "minc_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
        "backend_env": os.environ.get(_backend.ENV_VAR, "(unset: auto)"),
        "triton_interpret": _backend.triton_interpret(),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"unavailable ({type(exc).__name__}: {exc})"
    info["loss_backends"] = {name: loss_backend_status(name, torch.cuda.is_available(),
                                                       _backend.triton_interpret())
                             for name, spec in REGISTRY.items() if spec.op is not None}
    info["decision_tables"] = decision_tables()
    ok, _ = _ext.status()
    if ok:
        mod = _ext.load()
        built = getattr(mod, "build_info", lambda: {})()
        where = ("CPU and CUDA tensors" if built.get("cuda_compiled") else
                 "CPU tensors (no CUDA kernel in this build: CUDA lists use torch._foreach_lerp_)")
        info["ema_backend"] = f"compiled extension for {where} {built or ''}".rstrip()
    else:
        info["ema_backend"] = extension_missing(_ext._state.get("error"), _extension_file_exists())
        info["build_extension"] = build_command()
    return info


def decision_tables() -> dict:
    """The measured tables ``auto`` reads (minc_kernels.ops.tables), one line per family
    shipped or in force, and the override variable."""
    import torch

    from .ops import tables

    out: dict = {}
    override = os.environ.get(tables.TABLE_ENV)
    if override is not None:
        out[tables.TABLE_ENV] = override
    fams = {p.stem for p in tables.shipped_path("x").parent.glob("*.json")}
    if torch.cuda.is_available():
        fams |= {f for i in range(torch.cuda.device_count())
                 if (f := tables.family(torch.device("cuda", i)))}
    for fam in sorted(fams):
        try:
            table = tables._table(fam, override)
        except ValueError as exc:
            out[fam] = f"UNUSABLE: {exc}"
            continue
        if table is None:
            out[fam] = "no table: auto uses the cost models (python -m benchmarks.calibrate)"
        else:
            p = table.provenance
            out[fam] = (f"{len(table.decisions)} decisions measured on {p.get('device')}, "
                        f"commit {str(p.get('git_commit'))[:10]}, {p.get('date_utc')} "
                        f"({table.source})")
    if not fams:
        out["(none)"] = ("no measured table shipped: auto uses the cost models "
                         "(python -m benchmarks.calibrate on a GPU writes one)")
    return out


def _extension_file_exists() -> bool:
    """Whether a compiled ``minc_kernels._C`` is there to import (whether it loads or not)."""
    import importlib.util

    try:
        return importlib.util.find_spec("minc_kernels._C") is not None
    except (ImportError, ValueError):
        return False


def source_root() -> str | None:
    """The source checkout this package is imported from (editable install), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if all(os.path.isfile(os.path.join(root, f)) for f in ("setup.py", "pyproject.toml")):
        return root
    return None


def build_command() -> str:
    """The one command that builds the extension for this interpreter and its torch."""
    return format_build_command(source_root(), sys.executable)


def format_build_command(root: str | None, python: str) -> str:
    """``pip install`` of the checkout at ``root`` (editable), or of a source to name.

    ``MINC_KERNELS_BUILD_EXT=1`` makes a failed build stop with the compiler's error instead
    of installing pure Python again; ``--no-build-isolation`` builds against the torch that
    is installed (the extension's ABI follows it)."""
    cmd = f"MINC_KERNELS_BUILD_EXT=1 {python} -m pip install --no-build-isolation"
    if root is not None:
        return f"{cmd} -e {root}"
    return f"{cmd} <the minc_kernels source directory or sdist>"


def extension_missing(error: BaseException | None, file_exists: bool) -> str:
    """Plain words for why EMA updates run on ``torch._foreach_lerp_``: not built, built for
    another torch, or present but failing to load."""
    from ._ext import ExtensionMismatchError

    fallback = "torch._foreach_lerp_"
    if not file_exists:
        return (f"{fallback}: the C++/CUDA extension minc_kernels._C was not built (a pure-Python "
                "install: torch was not importable at build time, or the build failed and was "
                "skipped); build_extension below builds it")
    if isinstance(error, ExtensionMismatchError):
        return f"{fallback}: the extension was built for another torch and is not loaded ({error})"
    reason = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
    return (f"{fallback}: the extension minc_kernels._C is there but does not load ({reason}); "
            "build_extension below rebuilds it")


def main() -> None:
    for key, value in collect().items():
        if isinstance(value, dict):
            print(f"{key}:")
            width = max(map(len, value), default=0)
            for k, v in value.items():
                print(f"  {k:{width}s} {v}")
        elif isinstance(value, list):
            print(f"{key}: {', '.join(value) if value else '(none)'}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
