"""Triton's own host time per launch, measured on a CPU without a GPU.

    OMP_NUM_THREADS=1 python -m benchmarks.triton_host [--shapes 256x128] [--out DIR]

``benchmarks.cpu_host_overhead`` times the library's host work with every Triton launch
stubbed, so it leaves out what Triton itself does per ``kernel[grid](...)``: bind the
arguments, build the specialisation key (each tensor's alignment, each integer's
divisibility by 16 and equality to 1), look the compiled kernel up, check the globals it
read.  On a GPU that runs before every launch, on the host, and it grows with the number
of arguments.  This measures it: each loss's launches at a shape are recorded through the
real launchers on meta tensors (as ``benchmarks.static_sm90`` does: compiled for sm_90,
never run), then each launch is replayed ``--calls`` times through
``JITFunction.run(..., warmup=True)``, which does all of the above and stops before the
driver call.  **Not included**: the grid's evaluation, ``launch_metadata`` and the
driver's launcher (a C function that reads each argument and calls ``cuLaunchKernelEx``),
which only a GPU can time.

Thread CPU time per replay, median over ``--repeats`` rounds; per loss the sum over its
launches of one training forward (the gradient formed in the forward, as the ops do; the
backward's scaling of the saved gradient is a torch op).  Writes ``results.json`` and
``results.md``.  Numbers depend on the CPU: compare within one run.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # The real JIT (not the interpreter): before triton is imported.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["MINC_KERNELS_GRAM"] = "triton"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from triton.runtime.jit import JITFunction  # noqa: E402

from benchmarks import static_sm90 as S  # noqa: E402
from benchmarks.cpu_host_overhead import environment  # noqa: E402

LOSSES = ("spectral", "minc", "mio", "barlow_twins", "vicreg")


def replay_us(launch, calls: int) -> float:
    """Thread CPU µs of one ``JITFunction.run(..., warmup=True)`` of a recorded launch."""
    fn, args, kwargs, grid = launch.call
    run = JITFunction.run
    with S.sm90_driver():
        run(fn, *args, grid=grid, warmup=True, **kwargs)  # cached: no compile in the loop
        t0 = time.thread_time_ns()
        for _ in range(calls):
            run(fn, *args, grid=grid, warmup=True, **kwargs)
        return (time.thread_time_ns() - t0) / calls / 1e3


def n_args(launch) -> tuple[int, int]:
    """(runtime arguments, constexpr keyword arguments) of a launch."""
    _, args, kwargs, _ = launch.call
    return len(args), sum(1 for key in kwargs if key not in ("num_warps", "num_stages"))


def measure(loss: str, b: int, k: int, dtype_name: str, calls: int, repeats: int) -> dict:
    variant = S.LAUNCHERS[S.covered_losses()[loss].op][0]
    # MINC: MINCLoss's default step alone (the static suite's case adds the functional op)
    options = {"step_only": True} if loss == "minc" else {}
    launches, _ = S.run_case(loss, b, k, S.DTYPES[dtype_name], True, variant, **options)
    rows = []
    for ln in launches:
        times = [replay_us(ln, calls) for _ in range(repeats)]
        n_rt, n_ce = n_args(ln)
        rows.append(dict(kernel=ln.kernel, runtime_args=n_rt, constexprs=n_ce,
                         us=round(statistics.median(times), 2),
                         us_range=[round(min(times), 2), round(max(times), 2)]))
    label = f"{variant}, MINCLoss step" if options else variant
    return dict(loss=loss, variant=label, B=b, k=k, dtype=dtype_name, launches=rows,
                total_us=round(sum(r["us"] for r in rows), 1))


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = ["# Triton's host time per launch (CPU, no GPU)", "",
             f"Commit `{env['git_commit']}`, {env['machine']}, torch {env['torch']}, "
             f"triton {env['triton']}, load {env['load_average_start']}; {data['calls']} "
             f"replays × {data['repeats']} rounds per launch, thread CPU µs (median of the "
             "rounds).", "",
             "Per loss, the Triton launches of one training forward (gradient formed in the "
             "forward), bf16 unless stated:", "",
             "| loss | B × k | launches | Triton host µs per call | per launch (kernel: µs, "
             "runtime args) |", "|---|---|---:|---:|---|"]
    for r in data["cases"]:
        per = "; ".join(f"{x['kernel']}: {x['us']} ({x['runtime_args']})" for x in r["launches"])
        lines.append(f"| {r['loss']} ({r['variant']}, {r['dtype']}) | {r['B']} × {r['k']} "
                     f"| {len(r['launches'])} | {r['total_us']} | {per} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="256x128", help="BxK[,BxK...] (default 256x128)")
    ap.add_argument("--dtype", default="bf16", choices=tuple(S.DTYPES))
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cases = []
    for shape in args.shapes.split(","):
        b, k = (int(v) for v in shape.lower().split("x"))
        for loss in args.losses.split(","):
            cases.append(measure(loss, b, k, args.dtype, args.calls, args.repeats))
            print(f"{loss} {b}x{k}: {cases[-1]['total_us']} µs over "
                  f"{len(cases[-1]['launches'])} launches", flush=True)
    data = dict(environment=environment(), calls=args.calls,
                repeats=args.repeats, cases=cases)
    text = markdown(data)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
