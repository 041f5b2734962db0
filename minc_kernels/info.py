"""``python -m minc_kernels.info``: versions, device, and which backends are live (and why not)."""
from __future__ import annotations

import os
import platform
import sys


def collect() -> dict:
    import torch

    from . import __version__, _backend, _ext

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
    ops = {}
    for name in ("spectral", "minc", "mio"):
        ok, why = _backend.op_status(name)
        if ok and not (torch.cuda.is_available() or _backend.triton_interpret()):
            ops[name] = "kernels importable; reference used (no CUDA device; TRITON_INTERPRET=1 runs them on the CPU)"
        else:
            ops[name] = "triton kernels live" if ok else f"reference only ({why})"
    info["loss_backends"] = ops
    ok, why = _ext.status()
    if ok:
        mod = _ext.load()
        built = getattr(mod, "build_info", lambda: {})()
        info["ema_backend"] = f"compiled extension {built}" if built else "compiled extension"
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
