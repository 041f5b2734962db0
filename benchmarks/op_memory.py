"""Peak memory of one loss call (forward + backward) by provider, measured without a GPU.

    python -m benchmarks.op_memory [--losses barlow_twins,vicreg] [--shapes 256x8192,4096x8192]
                                   [--dtypes fp32,bf16] [--providers ...] [--out DIR]

What a GPU run reports as ``torch.cuda.max_memory_allocated() - allocated before`` is, for
every provider here, a property of the *allocations* a call makes, not of the device it
runs on.  This benchmark measures it on the CPU, one case per fresh process:

* Every ``torch.empty`` is made to touch its pages: deterministic mode with
  ``torch.utils.deterministic.fill_uninitialized_memory`` (the allocation is filled), so an
  allocation counts whether or not a kernel writes it, as on a GPU.
* glibc's ``mallopt(M_MMAP_THRESHOLD, 64 KiB)``: every allocation of 64 KiB or more is its
  own ``mmap`` and goes back to the kernel when freed, so the resident set follows the live
  allocations (no heap growth that a free leaves behind); and ``M_TRIM_THRESHOLD`` at its
  maximum: the heap of small allocations never shrinks during the call, so a free cannot
  take the resident set below the reading taken before it (which made the calibration read
  a few hundred KiB *under* its allocation once).  File-backed pages (shared libraries)
  that the kernel reclaims under memory pressure still can: readings are good to about
  1 MiB either way.
* The peak is ``VmHWM`` after ``/proc/self/clear_refs`` reset it, minus ``VmRSS`` before
  the call: the inputs (and anything a warm-up call left) are excluded; the gradients
  the call writes into ``.grad`` are included, as in the GPU runner
  (:func:`benchmarks.timing.peak_memory_mb`).
* ``minc_kernels``: the library's Triton launchers run for real on CPU tensors
  (``TRITON_INTERPRET=1`` lets the library take its kernel path), with every Triton launch
  **stubbed** (:class:`benchmarks.cpu_host_overhead.LaunchStub`): a Triton kernel allocates
  nothing itself, it only writes into the buffers its launcher allocated with torch, so the
  allocations (and their peak) are those of a GPU run; the values are not (the kernels
  did not run).  ``minc_kernels-<algorithm>`` forces one of the registry's algorithms;
  ``minc_kernels`` is the default (``auto``) choice, which depends on the dtype.
* ``eager-*``: the registry's eager formulations (``backend="reference"``); ``lightly``:
  lightly's own loss module, where the loss has one (Barlow Twins, VICReg); ``compile``:
  ``torch.compile`` of the reference, on the CPU (Inductor's CPU code: its buffer
  planning may differ from the GPU's).  These run for real (their values are real).

Known differences from a GPU measurement: the CUDA caching allocator rounds allocations
(to 512 B, and large blocks to 2 MiB) and cuBLAS keeps a workspace; the CPU's small
allocations (< 64 KiB) come from the heap and are not all returned.  A calibration
provider (``probe``: one 256 MiB allocation) checks the method; its row is in the table.

Writes ``results.json`` and ``results.md`` into ``--out`` (default
``benchmarks/results/cpu-op-memory-<date>/``).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .cpu_memory import _proc_status_kib as _status_kib
from .cpu_memory import _reset_peak

ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = Path(__file__).resolve().parent / "results"
MIB = float(1 << 20)
PROBE_MIB = 256
# lightly's modules for the losses that have one: (class name, constructor kwargs)
LIGHTLY = {"barlow_twins": ("BarlowTwinsLoss", {}), "vicreg": ("VICRegLoss", {})}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers
M_TRIM_THRESHOLD = -1


def _fixed_mmap_threshold(nbytes: int = 64 << 10) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        # both, or the reading is not the one the docstring describes
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


# --------------------------------------------------------------------------- providers
def providers_of(loss: str) -> list[str]:
    """Every provider label this benchmark knows for ``loss``."""
    from . import cases
    out = [e.label for e in cases.provider_entries(loss, ("eager", "compile"))]
    if loss in LIGHTLY:
        out.insert(0, "lightly")
    if cases.OP_NAME[loss]:
        out.append("minc_kernels")
        out += [f"minc_kernels-{a}" for a in cases.algorithms(loss)]
    return out


def _loss_fn(loss: str, provider: str):
    import torch

    from . import cases
    if provider == "probe":
        def probe(a, b):  # one PROBE_MIB allocation, live at the peak
            buf = torch.empty(PROBE_MIB << 18, dtype=torch.float32)
            return (a * 0).sum() + (b * 0).sum() + buf[:1].sum() * 0
        return probe
    if provider == "lightly":
        import lightly.loss
        name, kw = LIGHTLY[loss]
        mod = getattr(lightly.loss, name)(**kw)
        return lambda a, b: mod(a, b)
    family, _, algo = provider.partition("-")
    if family == "minc_kernels":
        return cases._functional_fn(loss, "triton", algo or "auto")
    if family == "eager":
        return cases._functional_fn(loss, "reference", algo or None)
    if family == "compile":
        return cases.CompiledCache(dynamic=False).get(loss)
    raise ValueError(f"unknown provider {provider!r} for {loss} (known: {providers_of(loss)})")


def worker(case: dict) -> dict:
    if case["provider"].startswith("minc_kernels"):
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    mmap_fixed = _fixed_mmap_threshold()
    import torch

    from . import cases
    torch.set_num_threads(case["threads"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    dtype = cases.DTYPES[case["dtype"]]
    fn = _loss_fn(case["loss"], case["provider"])
    stub = None
    if case["provider"].startswith("minc_kernels"):
        from .cpu_host_overhead import LaunchStub
        stub = LaunchStub().__enter__()

    def step(inputs) -> float:
        for x in inputs.grad_tensors:
            x.grad = None
        loss = fn(*inputs.args)
        loss.backward()
        return float(loss.detach())

    cpu = torch.device("cpu")
    # warm-up: lazy imports, thread pool; compile: compilation at the measured shape
    warm = (case["b"], case["k"]) if case["provider"] == "compile" else (8, 16)
    step(cases.make_inputs(case["loss"], *warm, dtype, cpu))
    inputs = cases.make_inputs(case["loss"], case["b"], case["k"], dtype, cpu, seed=1)
    if stub is not None:
        stub.counts.clear()  # launches of the measured call only
    if not _reset_peak():
        raise RuntimeError("op_memory needs Linux's /proc/self/clear_refs to reset the peak")
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    value = step(inputs)
    wall = time.perf_counter() - t0
    extra_kib = _status_kib("VmHWM") - rss0
    launches = dict(stub.counts) if stub is not None else None
    if stub is not None:
        stub.__exit__(None, None, None)
    return {"peak_mib": extra_kib / 1024, "wall_s": wall, "mmap_threshold_fixed": mmap_fixed,
            "value": None if stub is not None else value, "launches": launches,
            "input_mib": sum(x.numel() * x.element_size() for x in inputs.args) / MIB}


# --------------------------------------------------------------------------- driver
def run_case(case: dict, timeout_s: float) -> dict:
    rec = dict(case)
    rec["load_before"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the worker sets it for the minc_kernels providers only
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.op_memory", "--worker",
                               json.dumps(case)], capture_output=True, text=True,
                              timeout=timeout_s, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        rec.update(status="timeout", reason=f"no result within {timeout_s:.0f} s")
    else:
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            rec.update(json.loads(lines[-1]), status="ok")
        else:
            err = proc.stderr.strip().splitlines()
            rec.update(status="error", reason=err[-1][:300] if err else f"exit {proc.returncode}")
    rec["case_wall_s"] = time.perf_counter() - t0
    rec["load_after"] = os.getloadavg()[0]
    return rec


def plan(args) -> list[dict]:
    out = []
    base = {"threads": args.threads}
    for loss in args.losses:
        known = providers_of(loss)
        provs = [p for p in known if not args.providers or p in args.providers
                 or p.partition("-")[0] in args.providers]
        for b, k in args.shapes:
            for dt in args.dtypes:
                for p in provs:
                    if dt != "fp32" and not p.startswith("minc_kernels") and not args.all_dtypes:
                        continue  # eager/compile on CPU in 16-bit: slow and not a GPU proxy
                    out.append(dict(base, loss=loss, provider=p, b=b, k=k, dtype=dt))
    if args.probe:
        out.insert(0, dict(base, loss=args.losses[0], provider="probe", b=256, k=256, dtype="fp32"))
    return out


def markdown(data: dict) -> str:
    lines = [
        "# Peak memory of one forward + backward, by provider (measured on the CPU)",
        "",
        f"- {data['date']} UTC, {data['machine']}, torch {data['torch']}, commit "
        f"`{data['commit']}`{' (dirty tree)' if data['dirty'] else ''}",
        "- method: `benchmarks/op_memory.py` docstring: peak resident memory a call adds, "
        "allocations touched, large allocations mmapped; `minc_kernels*`: the real launchers "
        "with every Triton launch stubbed (allocations of a GPU run, no values)",
        f"- regenerate: `{data['command']}`",
        "",
        "| loss | B × k | dtype | provider | peak MiB | × inputs | launches | note |",
        "|---|---|---|---|---:|---:|---|---|",
    ]
    for r in data["cases"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['loss']} | {r['b']} × {r['k']} | {r['dtype']} | {r['provider']} "
                         f"| – | – | – | {r['status']}: {r.get('reason', '')} |")
            continue
        launches = ", ".join(f"{n} {c}" for n, c in sorted((r.get("launches") or {}).items()))
        note = "calibration: one %d MiB allocation" % PROBE_MIB if r["provider"] == "probe" else ""
        lines.append(f"| {r['loss']} | {r['b']} × {r['k']} | {r['dtype']} | {r['provider']} | "
                     f"{r['peak_mib']:.1f} | {r['peak_mib'] / r['input_mib']:.2f} | "
                     f"{launches or '–'} | {note} |")
    lines.append("")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    b, _, k = text.lower().partition("x")
    if not (b.isdigit() and k.isdigit()) or int(b) < 2 or int(k) < 1:
        raise argparse.ArgumentTypeError(f"--shapes: expected BxK with B >= 2, K >= 1 (e.g. "
                                         f"256x8192), got {text!r}")
    return int(b), int(k)


def parse_args(argv=None):
    from minc_kernels.losses import REGISTRY
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default="barlow_twins,vicreg",
                   help=f"comma-separated, from {list(REGISTRY)} (default: %(default)s)")
    p.add_argument("--shapes", default="256x8192,4096x8192",
                   help="comma-separated BxK (default: %(default)s)")
    p.add_argument("--dtypes", default="fp32,bf16", help="default: %(default)s; 16-bit dtypes "
                   "run the minc_kernels providers only unless --all-dtypes")
    p.add_argument("--all-dtypes", action="store_true")
    p.add_argument("--providers", default="",
                   help="comma-separated provider labels or families (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=900.0, help="per case")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="skip the calibration case")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    a.losses = [s for s in a.losses.split(",") if s]
    for name in a.losses:
        if name not in REGISTRY:
            p.error(f"--losses: unknown loss {name!r}; expected some of {list(REGISTRY)}")
    try:
        a.shapes = [_shape(s) for s in a.shapes.split(",") if s]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    a.dtypes = [s for s in a.dtypes.split(",") if s]
    for d in a.dtypes:
        if d not in ("fp32", "bf16", "fp16"):
            p.error(f"--dtypes: expected fp32, bf16 or fp16, got {d!r}")
    a.providers = [s for s in a.providers.split(",") if s]
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(json.loads(argv[1]))))
        return 0
    args = parse_args(argv)
    import torch

    from .cpu_host_overhead import _cpu_model, _git
    todo = plan(args)
    commit, dirty = _git()  # MINC_KERNELS_GIT_COMMIT names the commit of a git-archive tree
    now = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or RESULTS_ROOT / f"cpu-op-memory-{now:%Y-%m-%d}"
    data = {"date": f"{now:%Y-%m-%d %H:%M}", "machine": f"{_cpu_model()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "commit": commit,
            "dirty": dirty, "command": "python -m benchmarks.op_memory " + " ".join(argv),
            "cases": []}
    for i, case in enumerate(todo, 1):
        rec = run_case(case, args.timeout_s)
        data["cases"].append(rec)
        if not args.no_progress:
            peak = f"{rec['peak_mib']:.0f} MiB" if rec.get("status") == "ok" else rec["status"]
            print(f"[{i}/{len(todo)}] {case['loss']} {case['provider']} {case['b']}x{case['k']} "
                  f"{case['dtype']}: {peak} ({rec['case_wall_s']:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "results.md").write_text(markdown(data))
    print(f"wrote {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
