"""Host time per loss call with the kernel launches stubbed, and launch counts per loss.

    OMP_NUM_THREADS=1 python -m benchmarks.cpu_host_overhead [--out DIR] [--repeats 5]

What a small-shape training call costs on a GPU is mostly host work: argument checks,
dispatch, the autograd and ``torch.library`` machinery, output allocation, the small torch
ops around the kernels, and one launch per kernel (issue 21: fwd+bwd 0.5-1.8 ms at
B ≤ 1024, k ≤ 512 on the H200, where the arithmetic takes microseconds).  This benchmark
measures that host work without a GPU:

* The real launchers run with CPU tensors and ``backend="triton"`` (``TRITON_INTERPRET=1``
  lets the library take its kernel path on the CPU), but every Triton launch is **stubbed**:
  ``InterpretedFunction.run`` / ``JITFunction.run`` (and the autotuner's ``run``) only count
  the launch and return, so the interpreter never runs a kernel.  What is timed is the
  library's own host work plus the torch ops it issues around the kernels.  Those run for
  real on the CPU tensors: on partial buffers of a few hundred bytes that is dispatch cost,
  but the elementwise ops on B×k tensors (the backward's gradient scaling, MINC's feature
  normalisation) also do their arithmetic, which a GPU runs asynchronously.  So the
  16×16 shape (default first) shows the host work alone; larger shapes add that
  arithmetic.  **Not included**: Triton's own launcher (binding, specialisation key, cache
  lookup, the driver call), which on a GPU costs per launch what ``gpu_floor.json`` of the
  H200 results measured; ``benchmarks.triton_host`` measures all of it but the driver call
  on a CPU.
* Launch counts per call, from one extra call: Triton launches (per kernel), and torch
  operators from the profiler: all ``aten::`` ops, and those that would launch a device
  kernel on a GPU (approximate: the outermost ``aten::`` ops, except allocations and views,
  see :func:`count_ops`).  The reference backend's
  counts on the same shapes are given for comparison (its time is not: on CPU tensors its
  arithmetic runs for real).
* Timing: thread CPU time (``time.thread_time_ns``; CPU autograd runs backward on the
  calling thread) and wall time per call, one torch thread.  Each of ``--repeats`` rounds
  runs every case ``--calls`` times after warm-up calls; a round's figure is the median
  call; the table gives the median over rounds and the range of round medians.  Cases run
  in a shuffled order per round, so load changes hit all alike.

Paths timed per loss of ``minc_kernels.losses.REGISTRY`` that has kernels (``op``):
``functional`` (the registry's ``step``: the functional form, MINC's with its batch
moment) and ``module`` (the ``nn.Module``, MINC's with its moment update), each as ``fwd``
(the training forward: inputs require grad) and ``fwd+bwd`` (``loss.backward()``).  A
``control`` row times an empty call (the timer's floor).

``python -m benchmarks.cpu_host_overhead --compare OUT.md A=DIR,DIR B=DIR,DIR`` writes an
A/B table of such runs (alternate A and B runs, so that load drifts hit both).

Writes ``results.json`` and ``results.md`` into ``--out`` (default
``benchmarks/results/cpu-host-overhead-<date>/``).  On a shared working tree, measure a
clean copy of a commit: ``git archive HEAD | tar -x -C /tmp/clean``, then in /tmp/clean
``MINC_KERNELS_GIT_COMMIT=<sha> python -m benchmarks.cpu_host_overhead --out ...``.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # The library takes its kernel path for CPU tensors only under the interpreter flag;
    # it must be set before triton is imported.  The stub below keeps the interpreter idle.
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("functional", "module")
MODES = ("fwd", "fwd+bwd")

# aten ops that allocate or alias without launching a device kernel.
NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view",
    "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "t", "transpose",
    "permute", "expand", "expand_as", "detach", "detach_", "alias", "select", "slice",
    "unsqueeze", "squeeze", "unbind", "split", "split_with_sizes", "chunk", "narrow",
    "lift_fresh", "resolve_conj", "resolve_neg", "numpy_T", "view_as",
    "unflatten", "set_", "result_type", "size", "stride", "requires_grad_",
    "_has_compatible_shallow_copy_type"))
# aten ops that launch a copy kernel only when they convert or relayout.
MAYBE_COPY = frozenset(f"aten::{n}" for n in ("to", "_to_copy", "contiguous", "reshape",
                                               "flatten", "type_as"))


# --------------------------------------------------------------------------- launch stub
class LaunchStub:
    """Replaces Triton's launch entry points by a counter while active (a context manager).

    ``kernel[grid](...)`` calls ``<kernel>.run(..., grid=grid, warmup=False)``: under the
    interpreter ``InterpretedFunction.run``, else ``JITFunction.run``; an autotuned kernel
    goes through ``Autotuner.run`` first (patched too, so it cannot benchmark configs).
    """

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._saved: list = []

    def _targets(self):
        from triton.runtime import autotuner, jit

        out = [(jit.JITFunction, "run")]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            out.append((InterpretedFunction, "run"))
        except ImportError:  # pragma: no cover - triton without the interpreter
            pass
        for name in ("Autotuner", "Heuristics"):
            if hasattr(autotuner, name):
                out.append((getattr(autotuner, name), "run"))
        return out

    def __enter__(self):
        counts = self.counts

        def run(kernel, *args, **kwargs):
            if kwargs.get("warmup"):
                return None
            fn = getattr(kernel, "fn", kernel)
            while hasattr(fn, "fn") and not hasattr(fn, "__code__"):
                fn = fn.fn  # Autotuner/Heuristics wrap a JITFunction
            counts[getattr(fn, "__name__", type(kernel).__name__)] += 1
            return None

        for owner, attr in self._targets():
            self._saved.append((owner, attr, owner.__dict__[attr]))
            setattr(owner, attr, run)
        return self

    def __exit__(self, *exc):
        for owner, attr, orig in reversed(self._saved):
            setattr(owner, attr, orig)
        self._saved.clear()
        return False


# --------------------------------------------------------------------------- cases
def make_inputs(spec, b: int, k: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(len(spec.arg_names)):
        x = (torch.randn(b, k, generator=gen) / k ** 0.5).to(dtype)
        out.append(x.requires_grad_(i in spec.grad_args))
    return out


def call_fn(spec, path: str, k: int, backend: str) -> Callable:
    """``f(a, b) -> loss`` for ``path`` (``functional``: the registry's ``step``;
    ``module``: the ``nn.Module`` built once, with ``backend``)."""
    if path == "functional":
        return lambda a, b: spec.step(a, b, backend=backend)
    if path == "module":
        module = spec.module(**spec.module_kwargs(k), backend=backend)
        return module
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def runner(fn: Callable, inputs: list[torch.Tensor], mode: str) -> Callable[[], None]:
    grads = [x for x in inputs if x.requires_grad]

    if mode == "fwd":
        def run_fwd() -> None:
            fn(*inputs)
        return run_fwd
    if mode == "fwd+bwd":
        def run_fwd_bwd() -> None:
            for x in grads:
                x.grad = None
            fn(*inputs).backward()
        return run_fwd_bwd
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def count_ops(run: Callable[[], None]) -> dict:
    """aten ops of one call: all (nested ones included), and those that would launch a
    device kernel on a GPU: the outermost ``aten::`` ops (called from Python, a custom op or
    an autograd node, not from another aten op, whose CPU implementation details, such as
    ``sum`` filling its output first, a GPU does not share), except allocations and views
    (:data:`NO_KERNEL`); a conversion or ``contiguous`` (:data:`MAYBE_COPY`) counts when
    it copied."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [e for e in prof.events()]

    def is_aten(e) -> bool:
        return e.name.startswith("aten::")

    def copies(e) -> bool:
        return any(c.name == "aten::copy_" or copies(c) for c in e.cpu_children)

    kernel_ops: collections.Counter = collections.Counter()
    for e in events:
        if not is_aten(e) or (e.cpu_parent is not None and is_aten(e.cpu_parent)):
            continue
        if e.name in MAYBE_COPY:
            if copies(e):
                kernel_ops[e.name] += 1
        elif e.name not in NO_KERNEL:
            kernel_ops[e.name] += 1
    return {"aten_ops": sum(1 for e in events if is_aten(e)),
            "aten_kernel_ops": sum(kernel_ops.values()),
            "aten_kernel_op_names": dict(sorted(kernel_ops.items()))}


def time_calls(run: Callable[[], None], calls: int) -> tuple[list[float], list[float]]:
    """Per-call thread CPU µs and wall µs."""
    cpu, wall = [], []
    for _ in range(calls):
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        run()
        cpu.append((time.thread_time_ns() - c0) / 1e3)
        wall.append((time.perf_counter_ns() - w0) / 1e3)
    return cpu, wall


# --------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git() -> tuple[str | None, bool | None]:
    env = os.environ.get("MINC_KERNELS_GIT_COMMIT")  # a tree without .git (git archive)
    if env:
        return env, False
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "minc_kernels", "benchmarks/cpu_host_overhead.py"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip() != ""
        return sha, dirty
    except Exception:  # noqa: BLE001 - a copied tree without .git
        return None, None


def environment() -> dict:
    import triton

    sha, dirty = _git()
    return {
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical CPUs",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "torch_threads": torch.get_num_threads(),
        "git_commit": sha,
        "git_dirty_library": dirty,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }


# --------------------------------------------------------------------------- main
def losses_with_kernels(names: tuple[str, ...] | None = None) -> list:
    from minc_kernels.losses import REGISTRY

    specs = [s for n, s in REGISTRY.items() if names is None or n in names]
    return [s for s in specs if s.op]


def run_benchmark(args) -> dict:
    from minc_kernels import _backend

    if not _backend.triton_interpret():
        raise RuntimeError("set TRITON_INTERPRET=1 before triton is imported (python -m "
                           "benchmarks.cpu_host_overhead does): the library takes its kernel "
                           "path for CPU tensors only under the interpreter flag")
    torch.set_num_threads(args.threads)
    env = environment()  # the date and load average at the start
    dtype = DTYPES[args.dtype]
    specs = losses_with_kernels(args.losses)
    from minc_kernels.losses import REGISTRY

    skipped = {n: "no kernels (op is None)" for n, s in REGISTRY.items()
               if not s.op and (args.losses is None or n in args.losses)}
    cases = []  # (record, run)
    for spec in specs:
        for b, k in args.shapes:
            for path in PATHS:
                for mode in MODES:
                    inputs = make_inputs(spec, b, k, dtype, seed=args.seed)
                    fn = call_fn(spec, path, k, "triton")
                    rec = {"loss": spec.name, "op": spec.op, "B": b, "k": k,
                           "dtype": args.dtype, "path": path, "mode": mode}
                    cases.append((rec, runner(fn, inputs, mode), (spec, b, k, path, mode)))
    stub = LaunchStub()
    with stub:
        for rec, run, _ in cases:  # first call (imports, config caches), then counts
            t0 = time.perf_counter()
            run()
            rec["first_call_ms"] = (time.perf_counter() - t0) * 1e3
            stub.counts.clear()
            rec.update(count_ops(run))
            rec["triton_launches"] = sum(stub.counts.values())
            rec["triton_kernels"] = dict(sorted(stub.counts.items()))
            rec["launches"] = rec["triton_launches"] + rec["aten_kernel_ops"]
        for rec, run, _ in cases:
            for _ in range(args.warmup):
                run()
        control = {"loss": "control", "path": "empty call", "mode": "-", "B": None, "k": None,
                   "dtype": None}
        timed = [(rec, run) for rec, run, _ in cases] + [(control, lambda: None)]
        for rec, _ in timed:
            rec["rounds"] = []
        rng = random.Random(args.seed)
        for _ in range(args.repeats):
            order = list(timed)
            rng.shuffle(order)
            for rec, run in order:
                cpu, wall = time_calls(run, args.calls)
                rec["rounds"].append({"cpu_us": statistics.median(cpu),
                                      "wall_us": statistics.median(wall)})
    # The reference backend's counts (not its time: its arithmetic runs on the CPU).
    for rec, _, (spec, b, k, path, mode) in cases:
        inputs = make_inputs(spec, b, k, dtype, seed=args.seed)
        ref_run = runner(call_fn(spec, path, k, "reference"), inputs, mode)
        ref_run()
        ref = count_ops(ref_run)
        rec["reference_aten_kernel_ops"] = ref["aten_kernel_ops"]
        rec["reference_aten_ops"] = ref["aten_ops"]
    for rec, _ in timed:
        cpu = [r["cpu_us"] for r in rec["rounds"]]
        wall = [r["wall_us"] for r in rec["rounds"]]
        rec["cpu_us"] = {"median": statistics.median(cpu), "min": min(cpu), "max": max(cpu)}
        rec["wall_us"] = {"median": statistics.median(wall), "min": min(wall), "max": max(wall)}
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"schema": 1, "meta": env,
            "settings": {"shapes": [list(s) for s in args.shapes], "dtype": args.dtype,
                         "repeats": args.repeats, "calls": args.calls, "warmup": args.warmup,
                         "threads": args.threads, "backend": "triton (launches stubbed)",
                         "seed": args.seed},
            "skipped_losses": skipped,
            "cases": [rec for rec, _ in timed]}


def markdown(data: dict) -> str:
    meta, st = data["meta"], data["settings"]
    lines = ["# Host time per loss call, kernel launches stubbed (CPU)", "",
             f"- machine: {meta['machine']}; {meta['platform']}; load average "
             f"{meta['load_average_start']} → {meta['load_average_end']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, "
             f"{st['threads']} torch thread(s); commit `{meta['git_commit']}`"
             + (" (library files modified)" if meta.get("git_dirty_library") else ""),
             f"- date (UTC): {meta['date_utc']}; {st['repeats']} rounds × {st['calls']} calls "
             f"per case after {st['warmup']} warm-up calls, cases shuffled per round; dtype "
             f"{st['dtype']}",
             "",
             "`backend=\"triton\"` on CPU tensors under `TRITON_INTERPRET=1` with every Triton "
             "launch replaced by a counter (the interpreter never runs): the times are the "
             "library's host work and the small torch ops around its kernels, **without** "
             "Triton's own per-launch cost (add launches × a measured launch time for a GPU "
             "estimate). The torch ops run for real on the CPU tensors: at 16×16 that is "
             "dispatch cost alone; at larger shapes the elementwise ops on B×k tensors add "
             "CPU arithmetic that a GPU would run asynchronously. CPU µs = thread CPU time "
             "per call, median over rounds of each round's median call (range of round "
             "medians). Launch counts from one call: Triton launches; torch ops that would "
             "launch a kernel on a GPU (approximate: the outermost `aten::` ops except "
             "allocations and views); all `aten::` ops. The reference backend's kernel-op "
             "count on the same call is given for comparison.", ""]
    header = ["loss", "path", "mode", "B", "k", "CPU µs (range)", "wall µs", "Triton launches",
              "torch kernel ops", "launches", "aten ops", "reference kernel ops", "Triton kernels"]
    rows = []
    for r in data["cases"]:
        cpu, wall = r["cpu_us"], r["wall_us"]
        rows.append([r["loss"], r["path"], r["mode"], str(r["B"] or ""), str(r["k"] or ""),
                     f"{cpu['median']:.0f} ({cpu['min']:.0f}–{cpu['max']:.0f})"
                     if cpu["median"] >= 10 else f"{cpu['median']:.2f}",
                     f"{wall['median']:.0f}" if wall["median"] >= 10 else f"{wall['median']:.2f}",
                     str(r.get("triton_launches", "")), str(r.get("aten_kernel_ops", "")),
                     str(r.get("launches", "")), str(r.get("aten_ops", "")),
                     str(r.get("reference_aten_kernel_ops", "")),
                     ", ".join(f"{n}×{c}" for n, c in (r.get("triton_kernels") or {}).items())])
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if data.get("skipped_losses"):
        lines += ["", "Not measured: " + "; ".join(f"{n} ({why})" for n, why in
                                                  data["skipped_losses"].items())]
    torch_ops = collections.Counter()
    for r in data["cases"]:
        if r.get("path") == "functional" and r.get("mode") == "fwd+bwd":
            for name, c in (r.get("aten_kernel_op_names") or {}).items():
                torch_ops[(r["loss"], r["B"], r["k"], name)] += c
    if torch_ops:
        lines += ["", "## Torch kernel ops of the functional fwd+bwd call", "",
                  "| loss | B | k | op | count |", "|---|---|---|---|---|"]
        lines += [f"| {loss} | {b} | {k} | `{name}` | {c} |"
                  for (loss, b, k, name), c in sorted(torch_ops.items())]
    return "\n".join(lines) + "\n"


def compare_markdown(runs: dict[str, list[dict]]) -> str:
    """A/B table from several runs per label (``{label: [results.json data, ...]}``):
    per case, each label's median CPU µs per run and the ratio of the labels' medians over
    runs (first label / others).  Runs of one label should alternate with the others'
    (A, B, A, B) so that load drifts hit both."""
    labels = list(runs)
    keys: list = []
    cell: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    launches: dict = {}
    meta = {}
    for label, datas in runs.items():
        for data in datas:
            meta.setdefault(label, data["meta"])
            for r in data["cases"]:
                key = (r["loss"], r["path"], r["mode"], r["B"], r["k"])
                if key not in keys:
                    keys.append(key)
                cell[key][label].append(r["cpu_us"]["median"])
                launches[(key, label)] = r.get("launches")
    lines = ["# A/B: host time per call, launches stubbed", ""]
    for label in labels:
        m = meta[label]
        lines.append(f"- **{label}**: commit `{m['git_commit']}`, {len(runs[label])} runs; "
                     f"machine {m['machine']}; load averages at the starts: "
                     + ", ".join(str(d["meta"]["load_average_start"]) for d in runs[label]))
    lines += ["", "CPU µs = thread CPU time per call (each run: median over its rounds of "
              "the round medians); ratio = median over runs of the first label / that of "
              "the other (> 1: the other is faster).", ""]
    header = (["loss", "path", "mode", "B", "k"]
              + [f"{lb} CPU µs (runs)" for lb in labels]
              + [f"{labels[0]} / {lb}" for lb in labels[1:]]
              + [f"{lb} launches" for lb in labels])
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key in keys:
        row = [str(x) if x is not None else "" for x in key]
        med = {}
        for lb in labels:
            vals = cell[key].get(lb, [])
            med[lb] = statistics.median(vals) if vals else None
            row.append(f"{med[lb]:.0f} ({', '.join(f'{v:.0f}' for v in vals)})" if vals else "")
        for lb in labels[1:]:
            row.append(f"{med[labels[0]] / med[lb]:.2f}×" if med[labels[0]] and med[lb] else "")
        row += [str(launches.get((key, lb), "")) for lb in labels]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        b, _, k = item.strip().partition("x")
        if not (b.isdigit() and k.isdigit()):
            raise argparse.ArgumentTypeError(f"shapes are BxK, e.g. 256x128,1024x512; got {item!r}")
        out.append((int(b), int(k)))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_host_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--shapes", type=_shapes, default=[(16, 16), (256, 128), (1024, 512)],
                   help="BxK list (default 16x16: host work alone; 256x128 and 1024x512: the "
                        "corners of the small-shape target, torch ops' CPU arithmetic included)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--losses", type=lambda s: tuple(x for x in s.split(",") if x), default=None,
                   help="comma list of registry names (default: every loss with kernels)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.losses is not None:
        from minc_kernels.losses import REGISTRY

        bad = [n for n in args.losses if n not in REGISTRY]
        if bad:
            p.error(f"--losses: unknown {bad}; the registry has {list(REGISTRY)}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compare"]:
        return compare_main(argv[1:])
    args = parse_args(argv)
    data = run_benchmark(args)
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or RESULTS_ROOT / f"cpu-host-overhead-{day}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1))
    (out / "results.md").write_text(markdown(data))
    print(markdown(data))
    print(f"wrote {out}/results.json, results.md")
    return 0


def compare_main(argv) -> int:
    """``--compare OUT.md LABEL=DIR[,DIR...] LABEL=DIR[,DIR...]``: the A/B table of
    :func:`compare_markdown` from the runs' results.json, written to OUT.md."""
    if len(argv) < 3 or any("=" not in a for a in argv[1:]):
        print("usage: python -m benchmarks.cpu_host_overhead --compare OUT.md "
              "LABEL=DIR[,DIR...] LABEL=DIR[,DIR...]", file=sys.stderr)
        return 2
    runs = {}
    for item in argv[1:]:
        label, _, dirs = item.partition("=")
        runs[label] = [json.loads((Path(d) / "results.json").read_text())
                       for d in dirs.split(",") if d]
    text = compare_markdown(runs)
    Path(argv[0]).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
