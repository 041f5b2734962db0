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
    ok, why = _ext.status()
    if ok:
        mod = _ext.load()
        built = getattr(mod, "build_info", lambda: {})()
        where = ("CPU and CUDA tensors" if built.get("cuda_compiled") else
                 "CPU tensors (no CUDA kernel in this build: CUDA lists use torch._foreach_lerp_)")
        info["ema_backend"] = f"compiled extension for {where} {built or ''}".rstrip()
    else:
        info["ema_backend"] = f"torch._foreach_lerp_ (extension unavailable: {why})"
    return info


def main() -> None:
    for key, value in collect().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:10s} {v}")
        elif isinstance(value, list):
            print(f"{key}: {', '.join(value) if value else '(none)'}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
