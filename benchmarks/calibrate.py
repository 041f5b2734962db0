"""``python -m benchmarks.calibrate``: measure the speed choices ``auto`` makes, on this GPU.

Writes the decision table of :mod:`minc_kernels.ops.tables` (``table.json``: every
candidate's median time at every (rows, cols) of a grid) and ``calibration.md`` (the
winner and its margin per shape, and where the cost model or the old default would have
chosen otherwise).  Committed as ``minc_kernels/tables/<family>.json`` (``sm90``: H100 and
H200 share one), the table makes ``auto`` run what was measured fastest instead of what a
formula predicts.  Decisions, in order of value (a time budget cuts the last):

* ``gram.rowmat``, ``gram.rowmat_rounded``, ``gram.gram``, ``gram.cross_gram``,
  ``gram.gram_dot``: the Gram layer's Triton kernels against its cuBLAS form
  (``MINC_KERNELS_GRAM``), launcher by launcher, X of shape (rows, cols); ``rowmat`` with a
  fp32 ``G``, ``rowmat_rounded`` with ``G`` rounded to the rows' half dtype (what the bf16
  spectral Gram path and Barlow Twins' k×k path run; not measured in fp32 runs, where it
  would be ``rowmat`` again), which also races the kernels' wide tiles (``triton_wide``);
* ``spectral``, ``barlow_twins``, ``vicreg``: the ``"pairwise"`` or ``"gram"`` evaluation
  (spectral: also ``"matrix"``),
  (rows, cols) = (batch, features), with gradients, then (``--nograd``) without.  These
  are measured with the Gram-layer decisions of this run already in force (the table is
  rewritten after each decision and read through ``MINC_KERNELS_TABLE``).

Each case times the op's body (the launches; the autograd wrapper is the same for every
candidate) with the medians of :mod:`benchmarks.timing`.  The table is rewritten after every
decision, so a run cut short keeps what it measured; a case that fails (out of memory, a
compile error) is recorded as missing and named in the Markdown.

A CPU dry run (``--interpret``, tiny shapes) checks the plumbing: its times are the
interpreter's and its family (``interpret``) is never looked up.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

ALGORITHM_LOSSES = ("spectral", "barlow_twins", "vicreg")
GRAM_LAUNCHERS = ("rowmat", "rowmat_rounded", "gram", "cross_gram", "gram_dot")
DEFAULT_ORDER = ("gram.rowmat_rounded", "gram.rowmat", "gram.gram", "spectral",
                 "gram.cross_gram", "barlow_twins", "vicreg", "gram.gram_dot")
HALF_ONLY = ("gram.rowmat_rounded",)  # decisions with no fp32 case
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _ints(text: str) -> list[int]:
    try:
        vals = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    if not vals or vals[0] < 2:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 2, got {text!r}")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("calibration"), help="output folder")
    p.add_argument("--rows", type=_ints, default=[256, 1024, 4096, 8192],
                   help="rows (batch sizes) of the grid")
    p.add_argument("--cols", type=_ints, default=[128, 512, 2048, 8192],
                   help="columns (feature widths) of the grid")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                   help="storage dtype (one per run; the table keeps each dtype's own entries "
                        "when --merge names an earlier table)")
    p.add_argument("--decisions", default=",".join(DEFAULT_ORDER),
                   help=f"comma list, in the order to measure (default {','.join(DEFAULT_ORDER)})")
    p.add_argument("--nograd", action="store_true",
                   help="then the loss decisions without gradients (evaluation calls)")
    p.add_argument("--merge", type=Path, default=None,
                   help="an earlier table.json whose other decisions are kept")
    p.add_argument("--case-ms", type=float, default=30.0, help="measurement time per case")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started by then are recorded as missing")
    p.add_argument("--interpret", action="store_true",
                   help="CPU dry run under TRITON_INTERPRET=1 (tiny shapes only)")
    p.add_argument("--quiet", action="store_true", help="no line per case")
    args = p.parse_args(argv)
    names = [d for d in args.decisions.split(",") if d]
    known = set(ALGORITHM_LOSSES) | {f"gram.{n}" for n in GRAM_LAUNCHERS}
    bad = [d for d in names if d not in known]
    if bad or not names:
        p.error(f"--decisions: unknown {bad or names}; choose from {', '.join(sorted(known))}")
    args.decisions = names
    return args


# --------------------------------------------------------------------------- cases
_LAST_INPUTS: dict = {}


def _inputs(rows: int, cols: int, dtype, device, seed: int):
    """Two (rows, cols) operands in the storage dtype, drawn on the device (a CPU draw of
    8192² values would cost more than the case), kept for the next candidate of the shape."""
    import torch

    key = (rows, cols, dtype, str(device), seed)
    if key not in _LAST_INPUTS:
        _LAST_INPUTS.clear()
        g = torch.Generator(device=device).manual_seed(seed)
        # unit-norm-ish rows (what the losses see after a projector)
        x, y = (torch.randn(rows, cols, generator=g, device=device).div_(math.sqrt(cols))
                .to(dtype) for _ in range(2))
        _LAST_INPUTS[key] = (x, y)
    return _LAST_INPUTS[key]


def case_fn(decision: str, candidate: str, rows: int, cols: int, dtype, device, need_grad: bool):
    """A zero-argument callable running one candidate once (inputs made here, outside it)."""
    import torch

    from minc_kernels.ops import gram as G

    x, y = _inputs(rows, cols, dtype, device, seed=rows * 7919 + cols)
    if decision.startswith("gram."):
        launcher = decision.split(".", 1)[1]
        # a symmetric fp32 (k, k) operand, as MINC's moment or spectral's Gram (values do
        # not change the speed; made here, outside the timed call), rounded to the rows'
        # dtype for rowmat_rounded
        m = None
        if launcher in ("rowmat", "rowmat_rounded", "gram_dot"):
            m = (x.float().T @ x.float()).div_(rows)
            m = m.to(dtype) if launcher == "rowmat_rounded" else m
        env = {G.GRAM_ENV: candidate}
        if launcher in ("rowmat", "rowmat_rounded"):
            call = lambda: G.rowmat(x, m, y, None, 2.0 / rows, -2.0 / rows, 0.0, False, True)  # noqa: E731
        elif launcher == "gram":
            call = lambda: G.gram(x)  # noqa: E731
        elif launcher == "cross_gram":
            call = lambda: G.cross_gram(x, y)  # noqa: E731
        else:
            call = lambda: G.gram_dot(x, m)  # noqa: E731
        return _with_env(env, call)
    if decision == "spectral":
        from minc_kernels.ops.spectral import spectral_forward
        return lambda: spectral_forward(x, y, 1.0, True, candidate, need_grad)
    if decision == "barlow_twins":
        from minc_kernels.ops.barlow_twins import barlow_twins_forward
        return lambda: barlow_twins_forward(x, y, 5e-3, candidate, need_grad)
    from minc_kernels.ops.vicreg import vicreg_forward
    return lambda: vicreg_forward(x, y, 25.0, 25.0, 1.0, 1e-4, candidate, need_grad)


@contextlib.contextmanager
def scoped_env(env: dict):
    """The environment variables ``env`` set inside, restored (or removed) after: the
    per-call switches (``MINC_KERNELS_GRAM``, ...) that the launchers read."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _with_env(env: dict, call):
    def run():
        with scoped_env(env):
            return call()
    return run


def candidates_of(decision: str) -> tuple[str, ...]:
    if decision.startswith("gram."):
        from minc_kernels.ops.gram import gram_impls
        return gram_impls(decision.split(".", 1)[1])  # rowmat_rounded: also triton_wide
    if decision == "spectral":
        from minc_kernels.ops.spectral import ALGORITHMS
        return ALGORITHMS  # pairwise, matrix, gram
    return ("pairwise", "gram")


def decision_name(decision: str, dtype, need_grad: bool) -> str:
    from minc_kernels.ops import tables

    if decision.startswith("gram."):
        return tables.gram_decision(decision.split(".", 1)[1], dtype)
    return tables.algorithm_decision(decision, dtype, need_grad)


def baseline_choice(decision: str, rows: int, cols: int, dtype, need_grad: bool) -> str:
    """What ``auto`` chose before this table: the cost model, or Triton for the Gram layer."""
    if decision.startswith("gram."):
        return "triton"
    if decision == "spectral":
        from minc_kernels.ops.spectral import model_choice
        return model_choice(rows, cols, dtype, need_grad)
    from minc_kernels.ops.barlow_twins import choose_algorithm
    return choose_algorithm(rows, cols, dtype, need_grad)


# --------------------------------------------------------------------------- output
def _family(device) -> str:
    from minc_kernels.ops import tables

    return tables.family(device) or "interpret"


def provenance(device, args) -> dict:
    from benchmarks.run import environment

    env = environment(device)
    keep = ("device", "capability", "sm_count", "torch", "triton", "cuda", "python", "git_commit",
            "git_dirty", "date_utc", "triton_interpret")
    prov = {k: env.get(k) for k in keep}
    prov["command"] = "python -m benchmarks.calibrate " + " ".join(sys.argv[1:])
    prov["case_ms"] = args.case_ms
    return prov


def write_table(path: Path, family: str, prov: dict, decisions: dict) -> None:
    from minc_kernels.ops import tables

    data = {"schema": tables.SCHEMA, "family": family, "provenance": prov,
            "decisions": decisions}
    tables.parse(data, str(path))  # never write a table the loader would refuse
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def markdown(family: str, prov: dict, decisions: dict, notes: dict, failures: list) -> str:
    lines = [f"# Decision table `{family}`", "",
             f"- device: {prov.get('device')} (capability {prov.get('capability')}); torch "
             f"{prov.get('torch')}, triton {prov.get('triton')}, CUDA {prov.get('cuda')}",
             f"- commit {prov.get('git_commit')}, {prov.get('date_utc')}; `{prov.get('command')}`",
             "- each cell: the fastest candidate, its margin (the runner-up's / its median "
             "time) and its time; **bold** where `auto` chose otherwise before this table "
             "(the cost model, or Triton for the Gram layer); `-` not measured", ""]
    for name, grid in decisions.items():
        cands = list(grid["ms"])
        lines += [f"## `{name}`: {' vs '.join(cands)}", "",
                  "| rows \\ cols | " + " | ".join(str(c) for c in grid["cols"]) + " |",
                  "|---|" + "---|" * len(grid["cols"])]
        changed = total = 0
        for i, r in enumerate(grid["rows"]):
            cells = []
            for j, c in enumerate(grid["cols"]):
                times = {k: grid["ms"][k][i][j] for k in cands}
                if any(v is None for v in times.values()):
                    cells.append("-")
                    continue
                win, runner_up = sorted(times, key=times.get)[:2]
                margin = times[runner_up] / times[win]
                base = notes.get(name, {}).get((r, c))
                total += 1
                text = f"{win} {margin:.2f}× ({times[win]:.3g} ms)"
                if base is not None and base != win:
                    changed += 1
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines += ["", f"{changed} of {total} measured shapes differ from the choice before "
                  "this table.", ""]
    if failures:
        lines += ["## Cases that failed", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from benchmarks.timing import Budget, measure
    from minc_kernels.ops import tables

    if torch.cuda.is_available() and not args.interpret:
        device = torch.device("cuda")
    elif args.interpret:
        device = torch.device("cpu")
    else:
        print("calibrate: no CUDA device (use --interpret for a CPU dry run of tiny shapes)",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    args.out.mkdir(parents=True, exist_ok=True)
    table_path = args.out / "table.json"
    family = _family(device)
    prov = provenance(device, args)
    decisions: dict = {}
    if args.merge is not None:
        old = json.loads(Path(args.merge).read_text())
        tables.parse(old, str(args.merge))
        if old["family"] != family:
            print(f"calibrate: --merge {args.merge} is for {old['family']}, this device is "
                  f"{family}", file=sys.stderr)
            return 2
        decisions.update(old["decisions"])

    def save() -> None:
        write_table(table_path, family, prov, decisions)
        # later decisions (the losses) are measured with the Gram-layer choices made so far
        os.environ[tables.TABLE_ENV] = str(table_path)
        tables.clear_cache()

    if decisions:
        save()
    budget = Budget(warmup_ms=min(10.0, args.case_ms), measure_ms=args.case_ms, min_reps=3,
                    max_reps=50)
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    plan = [(d, True) for d in args.decisions if d not in HALF_ONLY or dtype != torch.float32]
    if args.nograd:
        plan += [(d, False) for d in args.decisions if d in ALGORITHM_LOSSES]
    n_cases = sum(len(candidates_of(d)) for d, _ in plan) * len(args.rows) * len(args.cols)
    notes: dict = {}
    failures: list = []
    done = 0
    t_start = time.monotonic()
    for decision, need_grad in plan:
        name = decision_name(decision, dtype, need_grad)
        cands = candidates_of(decision)
        ms = {c: [[None] * len(args.cols) for _ in args.rows] for c in cands}
        notes[name] = {}
        for i, r in enumerate(args.rows):
            for j, c in enumerate(args.cols):
                notes[name][(r, c)] = baseline_choice(decision, r, c, dtype, need_grad)
                for cand in cands:
                    done += 1
                    if deadline is not None and time.monotonic() > deadline:
                        continue
                    try:
                        fn = case_fn(decision, cand, r, c, dtype, device, need_grad)
                        got = measure(fn, device, budget)
                        ms[cand][i][j] = round(got["median_ms"], 5)
                        msg = f"{got['median_ms']:.4g} ms"
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        failures.append(f"{name} {r}×{c} {cand}: {type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
                        msg = f"FAILED ({type(exc).__name__})"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    if not args.quiet:
                        print(f"[{done}/{n_cases} {time.monotonic() - t_start:5.0f} s] {name} "
                              f"{r}×{c} {cand}: {msg}", file=sys.stderr, flush=True)
        decisions[name] = {"rows": list(args.rows), "cols": list(args.cols), "ms": ms}
        save()
    skipped = sum(v is None for g in decisions.values() for m in g["ms"].values()
                  for row in m for v in row)
    md = markdown(family, prov, decisions, notes, failures)
    (args.out / "calibration.md").write_text(md)
    print(md)
    print(f"calibrate: {table_path} ({len(decisions)} decisions, {skipped} cells missing, "
          f"{len(failures)} failed) in {time.monotonic() - t_start:.0f} s; commit it as "
          f"minc_kernels/tables/{family}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
