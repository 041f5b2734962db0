"""``python -m benchmarks.run``: eager vs ``torch.compile`` vs minc_kernels, side by side.

Writes ``results.json`` (rewritten as the run goes, so an interrupted run keeps what it
measured), then ``results.md`` and PNG plots, into
``benchmarks/results/<device>-<YYYY-MM-DD>/`` (``--out DIR`` overrides), and prints a
summary table last.  Order: ceilings, EMA, then the losses with ``fwd+bwd`` first (and
the MIO memory case right after it), then ``fwd``, then ``bwd``, so that a time budget
(``--time-budget``) or a kill cuts the least important cases.  See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _csv(kind):
    def parse(text: str):
        return tuple(kind(x) for x in text.split(",") if x.strip())
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results/<device>-<date>)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="a small subset of the shape grid")
    p.add_argument("--B", type=_csv(int), default=None, help="batch sizes, e.g. 256,1024")
    p.add_argument("--k", type=_csv(int), default=None, help="feature dims, e.g. 128,2048")
    p.add_argument("--dtype", type=_csv(str), default=None,
                   help="fp32,bf16,fp16 (default bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--losses", type=_csv(str), default=None,
                   help="comma list of minc_kernels.losses.REGISTRY names (default: all)")
    p.add_argument("--modes", type=_csv(str), default=("fwd+bwd", "fwd", "bwd"))
    p.add_argument("--providers", type=_csv(str), default=("eager", "compile", "minc_kernels"))
    p.add_argument("--ema", choices=("auto", "resnet50", "resnet18", "off"), default="auto",
                   help="EMA parameter list (auto: resnet50 on a GPU, resnet18 on the CPU)")
    p.add_argument("--ema-providers", type=_csv(str),
                   default=("loop", "foreach", "minc_kernels", "extension-raw"))
    p.add_argument("--memory-case", choices=("auto", "on", "off"), default="auto",
                   help="MIO B=32768 k=128 fwd+bwd (auto: on a GPU only)")
    p.add_argument("--no-ceilings", action="store_true")
    p.add_argument("--interpret", action="store_true",
                   help="on the CPU, run the Triton kernels under TRITON_INTERPRET=1 (tiny shapes)")
    p.add_argument("--compile-dynamic", choices=("true", "default", "false"), default="true",
                   help="torch.compile(dynamic=...): true (default) compiles each loss once for "
                        "all shapes; default = PyTorch's policy (static first, then dynamic); "
                        "false = one compilation per shape (slow on a full grid)")
    p.add_argument("--case-ms", type=float, default=None,
                   help="measurement time per case in ms (default 40 on a GPU, 100 on the CPU)")
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started by then are recorded as skipped")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU); 1 avoids OpenMP stalls on a busy machine")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.interpret:
        # Must precede the first import of triton (the registry's loss homes import it).
        os.environ["TRITON_INTERPRET"] = "1"
    from minc_kernels.losses import REGISTRY

    if args.losses is None:
        args.losses = tuple(REGISTRY)
    for name, allowed in (("losses", tuple(REGISTRY)),
                          ("modes", ("fwd+bwd", "fwd", "bwd")),
                          ("providers", ("eager", "compile", "minc_kernels")),
                          ("ema_providers", ("loop", "foreach", "minc_kernels", "extension-raw")),
                          ("dtype", ("fp32", "bf16", "fp16"))):
        bad = [v for v in (getattr(args, name) or ()) if v not in allowed]
        if bad:
            p.error(f"--{name.replace('_', '-')}: unknown {bad}; choose from {allowed}")
    return args


# --------------------------------------------------------------------------- environment
def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU {model} ({n} thread{'s' if n != 1 else ''})"


def slugify(text: str) -> str:
    text = re.sub(r"\(.*?\)", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def git_commit() -> tuple[str | None, bool | None]:
    env = os.environ.get("MINC_KERNELS_GIT_COMMIT")
    if env:
        return env, None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip() != ""
        return sha, dirty
    except Exception:  # noqa: BLE001 - a copied tree without .git
        return None, None


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: CPU timings on a shared machine need this context."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def probe_extension(timeout: float = 180.0) -> tuple[bool, str]:
    """Load the compiled extension in a child process first: a broken build can abort the
    interpreter (a C++ exception at schema registration), which must not take the run down."""
    code = ("from minc_kernels import _ext\n"
            "ok, why = _ext.status()\n"
            "print(why)\n"
            "raise SystemExit(0 if ok else 3)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"loading the extension took over {timeout:.0f} s in a probe process"
    if proc.returncode == 0:
        return True, "ok"
    if proc.returncode == 3:
        return False, proc.stdout.strip()[-300:]
    tail = (proc.stderr or proc.stdout).strip().replace("\n", " ")[-300:]
    return False, f"loading the extension crashed the probe process (rc {proc.returncode}): {tail}"


def _ops_of_registry() -> dict:
    from minc_kernels.losses import REGISTRY

    return {name: spec.op for name, spec in REGISTRY.items()}


def decision_table(device) -> dict:
    """Which measured decision table ``auto`` used on ``device`` (minc_kernels.ops.tables):
    its file, family and provenance, or None (the cost models decided)."""
    from minc_kernels.ops import tables

    table = tables.table_for(device)
    return {"decision_table_env": os.environ.get(tables.TABLE_ENV),
            "decision_table": None if table is None else {
                "file": table.source, "family": table.family,
                "measured_on": table.provenance.get("device"),
                "commit": table.provenance.get("git_commit"),
                "date_utc": table.provenance.get("date_utc")}}


def environment(device, extension: tuple[bool, str] | None = None) -> dict:
    import torch

    from minc_kernels import _backend, _ext

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001
        triton_version = f"unavailable ({type(exc).__name__})"
    sha, dirty = git_commit()
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": sha,
        "git_dirty": dirty,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "load_average_start": _loadavg(),
        "triton_interpret": _backend.triton_interpret(),
        "ops": {name: (_backend.op_status(op)[1] if op else "no kernels")
                for name, op in _ops_of_registry().items()},
        "extension": (extension or _ext.status())[1],
    }
    env.update(decision_table(device))
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env["capability"] = f"{prop.major}.{prop.minor}"
        env["memory_gib"] = round(prop.total_memory / 2**30, 1)
        env["sm_count"] = prop.multi_processor_count
    return env


# --------------------------------------------------------------------------- results file
class Results:
    def __init__(self, out: Path, data: dict):
        self.out = out
        self.data = data
        self._last_save = 0.0

    def save(self, force: bool = True) -> None:
        if not force and time.monotonic() - self._last_save < 5.0:
            return
        from .report import add_derived

        add_derived(self.data)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out / "results.json")
        self._last_save = time.monotonic()


def _free_device_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:400]


# --------------------------------------------------------------------------- loss cases
def loss_plan(args, device, dtypes) -> list[tuple]:
    """(mode, loss, B, k, dtype, tag) in run order."""
    from . import cases

    if args.B or args.k:
        bs = args.B or (cases.GPU_QUICK_B if device.type == "cuda" else cases.CPU_QUICK_B)
        ks = args.k or (cases.GPU_QUICK_K if device.type == "cuda" else cases.CPU_QUICK_K)
    elif device.type == "cuda":
        bs, ks = ((cases.GPU_QUICK_B, cases.GPU_QUICK_K) if args.quick
                  else (cases.GPU_B, cases.GPU_K))
    else:
        bs, ks = ((cases.CPU_QUICK_B, cases.CPU_QUICK_K) if args.quick
                  else (cases.CPU_B, cases.CPU_K))
    memory_case = args.memory_case == "on" or (args.memory_case == "auto" and device.type == "cuda")
    plan = []
    for mode in args.modes:
        for loss in args.losses:
            for k in ks:
                for b in bs:
                    for dt in dtypes:
                        plan.append((mode, loss, b, k, dt, "grid"))
        if mode == "fwd+bwd" and memory_case and "mio" in args.losses:
            b, k = cases.MIO_MEMORY_CASE
            plan.extend(("fwd+bwd", "mio", b, k, dt, "memory") for dt in dtypes)
    if memory_case and "fwd+bwd" not in args.modes and "mio" in args.losses:
        b, k = cases.MIO_MEMORY_CASE
        plan.extend(("fwd+bwd", "mio", b, k, dt, "memory") for dt in dtypes)
    return plan


def minc_kernels_unavailable(loss: str, device, interpret: bool) -> str | None:
    from minc_kernels import _backend

    from . import cases

    if device.type != "cuda" and not interpret:
        return ("no CUDA device (pass --interpret to run the Triton kernels on the CPU "
                "under TRITON_INTERPRET=1; tiny shapes only)")
    op = cases.OP_NAME[loss]
    if op is None:
        return "the loss has no Triton kernels (registry op is None)"
    ok, why = _backend.op_status(op)
    return None if ok else f"triton op unavailable: {why}"


def run_loss_cases(args, device, dtypes, results: Results, deadline: float | None, bar) -> None:
    import torch

    from . import cases
    from .timing import Budget, is_oom, measure, peak_memory_mb

    budget = Budget(warmup_ms=10.0 if device.type == "cuda" else 30.0,
                    measure_ms=args.case_ms or (40.0 if device.type == "cuda" else 100.0),
                    min_reps=3, max_reps=args.max_reps)
    dynamic = {"default": None, "true": True, "false": False}[args.compile_dynamic]
    compiled = cases.CompiledCache(dynamic)
    records = results.data["cases"]
    plan = loss_plan(args, device, dtypes)
    group = None
    for mode, loss, b, k, dt, tag in plan:
        if group is not None and group != (mode, loss):
            results.save()
        group = (mode, loss)
        dtype = cases.DTYPES[dt]
        inputs = None
        for entry in cases.provider_entries(loss, tuple(args.providers)):
            rec = {"kind": "loss", "tag": tag, "loss": loss, "algorithm": entry.algorithm,
                   "B": b, "k": k, "dtype": dt, "mode": mode, "provider": entry.label,
                   "family": entry.family, "status": "ok", "reason": None,
                   "median_ms": None, "min_ms": None, "reps": None, "first_call_s": None,
                   "peak_mb": None,
                   "grad_in_forward": cases.grad_in_forward(entry.family, loss),
                   "flops": cases.loss_flops(loss, entry.algorithm, b, k, mode,
                                             cases.grad_in_forward(entry.family, loss)),
                   "bytes": cases.loss_bytes(loss, b, k, dtype.itemsize, mode,
                                             cases.grad_in_forward(entry.family, loss))}
            records.append(rec)
            if bar is not None:
                bar.set_description(f"{loss} {mode} B={b} k={k} {entry.label}"[:60])
                bar.update(1)
            reason = None
            if deadline is not None and time.monotonic() > deadline:
                reason = "time budget exhausted before this case started"
            elif entry.family == "minc_kernels":
                reason = minc_kernels_unavailable(loss, device, args.interpret)
            elif entry.family == "compile" and (loss, mode == "bwd") in compiled.broken:
                reason = (f"torch.compile failed earlier for {loss}: "
                          f"{compiled.broken[(loss, mode == 'bwd')]}")
            if reason:
                rec.update(status="skipped", reason=reason)
                continue
            oom = False
            try:
                if inputs is None:
                    inputs = cases.make_inputs(loss, b, k, dtype, device, seed=args.seed)
                ctx = (compiled.mode_context(mode) if entry.family == "compile"
                       else contextlib.nullcontext())
                with ctx:
                    fn = cases.loss_fn(loss, entry, compiled, mode)
                    run = cases.mode_runner(fn, inputs, mode)
                    res = measure(run, device, budget)
                    rec.update(res)
                    rec["peak_mb"] = peak_memory_mb(run, device)
                    del run
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - recorded, the run goes on
                if is_oom(exc):
                    rec.update(status="oom", reason=_short(exc))
                    oom = True
                else:
                    rec.update(status="error", reason=_short(exc))
                    if entry.family == "compile":
                        compiled.broken[(loss, mode == "bwd")] = _short(exc)
            if inputs is not None:
                for x in inputs.grad_tensors:
                    x.grad = None
            if oom:
                inputs = None
                _free_device_memory(device)
            results.save(force=False)
        del inputs
        if device.type == "cuda" and (b * k >= 2**22 or tag == "memory"):
            _free_device_memory(device)
    results.save()


# --------------------------------------------------------------------------- EMA cases
def run_ema_cases(args, device, results: Results, extension: tuple[bool, str], bar) -> None:
    import torch

    from . import cases
    from .timing import Budget, is_oom, measure

    scale = args.ema if args.ema != "auto" else ("resnet50" if device.type == "cuda" else "resnet18")
    model, shapes = cases.byol_target_shapes(scale)
    n_params = sum(int(torch.Size(s).numel()) for s in shapes)
    budget = Budget(warmup_ms=20.0, measure_ms=100.0 if device.type == "cuda" else 300.0,
                    min_reps=5 if device.type == "cuda" else 3, max_reps=args.max_reps)
    for online in ("fp32", "bf16"):
        odt = cases.DTYPES[online]
        targets, onlines = cases.ema_tensors(shapes, odt, device, seed=args.seed)
        for prov in args.ema_providers:
            rec = {"kind": "ema", "model": model, "n_tensors": len(shapes), "n_params": n_params,
                   "online_dtype": online, "target_dtype": "fp32", "provider": prov,
                   "bytes_per_param": cases.ema_bytes_per_param(odt), "status": "ok",
                   "reason": None, "median_ms": None, "reps": None}
            results.data["ema"].append(rec)
            if bar is not None:
                bar.set_description(f"ema {online} {prov}")
                bar.update(1)
            if prov in ("minc_kernels", "extension-raw") and not extension[0]:
                rec.update(status="skipped", reason=f"extension unavailable: {extension[1]}")
                continue
            try:
                fn = cases.ema_fn(prov, targets, onlines, momentum=0.996)
            except Exception as exc:  # noqa: BLE001
                rec.update(status="skipped", reason=_short(exc))
                continue
            try:
                res = measure(fn, device, budget)
                rec.update(res)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001
                rec.update(status="oom" if is_oom(exc) else "error", reason=_short(exc))
        del targets, onlines
        _free_device_memory(device)
    results.save()


# --------------------------------------------------------------------------- main
def _on_sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)  # sets TRITON_INTERPRET for --interpret
    import torch

    from . import cases
    from .ceilings import measure_ceilings, merge_best
    from .report import summary_text, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device", file=sys.stderr)
            return 2
    if device.type == "cuda" and device.index is None:
        # An explicit index: some torch.cuda calls reject a bare torch.device("cuda").
        device = torch.device("cuda", torch.cuda.current_device())
    dtypes = list(args.dtype or (("bf16",) if device.type == "cuda" else ("fp32",)))
    started = time.monotonic()
    deadline = started + args.time_budget if args.time_budget else None

    ext_ok, ext_why = probe_extension() if args.ema != "off" else (False, "not probed (--ema off)")
    env = environment(device, (ext_ok, ext_why))
    env["argv"] = list(argv) if argv is not None else sys.argv[1:]
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or RESULTS_ROOT / f"{slugify(env['device'])}-{day}"
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": 1,
        "meta": env,
        "settings": {"dtypes": dtypes, "losses": list(args.losses), "modes": list(args.modes),
                     "providers": list(args.providers), "quick": args.quick,
                     "compile_dynamic": args.compile_dynamic, "case_ms": args.case_ms,
                     "max_reps": args.max_reps, "time_budget_s": args.time_budget,
                     "interpret": args.interpret, "seed": args.seed, "threads": args.threads},
        "ceilings": None,
        "ema": [],
        "cases": [],
    }
    results = Results(out, data)
    try:  # `timeout` sends SIGTERM: stop like on Ctrl-C and write what was measured
        old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        old_handler = None
    n_loss = sum(len(cases.provider_entries(loss, tuple(args.providers)))
                 for (_, loss, *_rest) in loss_plan(args, device, dtypes))
    n_ema = 0 if args.ema == "off" else 2 * len(args.ema_providers)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_loss + n_ema, unit="case", dynamic_ncols=True, mininterval=1.0)
    print(f"benchmarks: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"out {out}", flush=True)
    try:
        if not args.no_ceilings:
            data["ceilings"] = measure_ceilings(device, [cases.DTYPES[d] for d in dtypes])
            results.save()
        if args.ema != "off":
            run_ema_cases(args, device, results, (ext_ok, ext_why), bar)
        run_loss_cases(args, device, dtypes, results, deadline, bar)
        if data["ceilings"] is not None:
            again = measure_ceilings(device, [cases.DTYPES[d] for d in dtypes])
            data["ceilings"] = merge_best(data["ceilings"], again)
    except KeyboardInterrupt as exc:
        data["meta"]["interrupted"] = str(exc) or "KeyboardInterrupt"
        print(f"\ninterrupted ({data['meta']['interrupted']}); writing what was measured",
              file=sys.stderr)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if bar is not None:
            bar.close()
        data["meta"]["wall_s"] = round(time.monotonic() - started, 1)
        data["meta"]["load_average_end"] = _loadavg()
        results.save()
        write_report(data, out, plots=not args.no_plots)
    print(summary_text(data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
