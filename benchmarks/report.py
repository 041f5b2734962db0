"""Tables and plots from ``results.json``.

``python -m benchmarks.report DIR`` rebuilds ``DIR/results.md`` and the plots from
``DIR/results.json`` (e.g. after a run was cut short) and prints the summary;
``python -m benchmarks.report --ab DIR_A DIR_B`` puts the cases two runs both measured
side by side (e.g. the Gram layer's Triton kernels against its cuBLAS candidate).

Derived numbers (added to every record by :func:`add_derived`):

* ``flops``, ``bytes``: the work models of :mod:`benchmarks.floors` (recomputed here for
  the losses it models, so a report rebuilt from an older ``results.json`` uses the current
  models; other losses keep what the runner stored from their registry entry), with
  ``grad_in_forward`` (the provider's ops form the input gradient in the forward: credited
  with the backward's work in ``fwd``, none in ``bwd``);
* ``tflops`` = ``flops / median`` (None when the mode does no matmul work),
  ``frac_matmul`` = that over the measured matmul ceiling of the case's dtype;
* ``floor`` = ``max(flops / matmul ceiling, bytes / copy ceiling, launches × launch
  floor)`` with its parts and the ``bound`` that binds; ``frac_floor`` = floor / median
  (100 % = the measurement is at the floor).  The launch floor is ``ceilings.launch``;
  a results folder measured before the runner had it may carry ``gpu_floor.json`` from
  the same machine, whose Triton launch time is used instead (:func:`attach_launch_floor`);
* ``speedup_vs_eager`` = best eager median / this median, on the same loss, shape,
  dtype and mode (spectral: the faster of ``eager-pairwise`` and ``eager-gram``);
* EMA: ``gbps`` = bytes per parameter × parameters / median, ``frac_copy`` = that over
  the measured copy ceiling, ``speedup_vs_foreach``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from . import floors

DTYPE_FULL = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROVIDER_ORDER = ("eager", "eager-pairwise", "eager-gram", "compile", "minc_kernels")
STATUS_CELL = {"oom": "OOM", "error": "error", "skipped": "–"}


def _ok(rec: dict) -> bool:
    return rec.get("status") == "ok" and rec.get("median_ms")


def attach_launch_floor(data: dict, folder: Path) -> None:
    """A results.json without ``ceilings.launch`` (``custom_op``): take it from
    ``gpu_floor.json`` beside it when there is one (measured on the same machine: one
    1-block Triton kernel launched and synchronised, median, minus the median of an empty
    synchronise; the custom op's synchronised medians)."""
    ceil = data.get("ceilings")
    side = folder / "gpu_floor.json"
    if not ceil or not side.exists():
        return
    f = json.loads(side.read_text())
    if not ceil.get("custom_op") and f.get("custom_op_fwd_ms") and f.get("custom_op_fwd_bwd_ms"):
        ceil["custom_op"] = {
            "fwd_ms": f["custom_op_fwd_ms"], "fwd_bwd_ms": f["custom_op_fwd_bwd_ms"],
            "how": "gpu_floor.json: a torch.library.custom_op around one Triton launch, with a "
                   "registered backward; synchronised medians (a synchronise after each call)",
            "source": "gpu_floor.json"}
    if ceil.get("launch"):
        return
    if f.get("triton_launch_ms") and f.get("sync_roundtrip_ms") is not None:
        ceil["launch"] = {
            "ms": f["triton_launch_ms"] - f["sync_roundtrip_ms"],
            "how": (f"gpu_floor.json: one 1-block Triton launch + synchronise "
                    f"({f['triton_launch_ms']:.4f} ms, median) minus an empty synchronise "
                    f"({f['sync_roundtrip_ms']:.4f} ms)"),
            "source": "gpu_floor.json"}


def add_derived(data: dict) -> dict:
    ceil = data.get("ceilings") or {}
    matmul = {k: v.get("tflops") for k, v in (ceil.get("matmul") or {}).items()}
    copy = (ceil.get("copy") or {}).get("gbps")
    launch = (ceil.get("launch") or {}).get("ms")
    best: dict = {}
    for rec in data.get("cases", []):
        if rec.get("family") == "eager" and _ok(rec):
            key = (rec["loss"], rec["B"], rec["k"], rec["dtype"], rec["mode"])
            if key not in best or rec["median_ms"] < best[key][0]:
                best[key] = (rec["median_ms"], rec["provider"], rec.get("peak_mb"))
    for rec in data.get("cases", []):
        rec["tflops"] = rec["frac_matmul"] = rec["speedup_vs_eager"] = None
        rec["eager_baseline"] = rec["memory_vs_eager"] = rec["frac_floor"] = None
        if rec.get("grad_in_forward") is None:
            rec["grad_in_forward"] = rec.get("family") in floors.GRAD_IN_FORWARD_FAMILIES
        fused = bool(rec["grad_in_forward"])
        if rec["loss"] in floors.MODELLED or rec.get("flops") is None:
            rec["flops"] = floors.loss_flops(rec["loss"], rec.get("algorithm"), rec["B"],
                                             rec["k"], rec["mode"], fused)
        if rec["loss"] in floors.MODELLED or rec.get("bytes") is None:
            rec["bytes"] = floors.loss_bytes(rec["loss"], rec["B"], rec["k"],
                                             floors.ITEMSIZE[rec["dtype"]], rec["mode"], fused)
        peak = matmul.get(DTYPE_FULL.get(rec["dtype"], rec["dtype"]))
        rec["floor"] = floors.floor(rec["flops"], rec["bytes"], floors.MIN_LAUNCHES[rec["mode"]],
                                    peak, copy, launch)
        if not _ok(rec):
            continue
        if rec["floor"]["ms"]:
            rec["frac_floor"] = rec["floor"]["ms"] / rec["median_ms"]
        if rec["flops"] > 0:
            rec["tflops"] = rec["flops"] / (rec["median_ms"] * 1e-3) / 1e12
            if peak:
                rec["frac_matmul"] = rec["tflops"] / peak
        base = best.get((rec["loss"], rec["B"], rec["k"], rec["dtype"], rec["mode"]))
        if base:
            rec["speedup_vs_eager"] = base[0] / rec["median_ms"]
            rec["eager_baseline"] = base[1]
            if base[2] and rec.get("peak_mb") is not None:
                rec["memory_vs_eager"] = rec["peak_mb"] / base[2]
    foreach = {}
    for rec in data.get("ema", []):
        if rec["provider"] == "foreach" and _ok(rec):
            foreach[rec["online_dtype"]] = rec["median_ms"]
    for rec in data.get("ema", []):
        rec["gbps"] = rec["frac_copy"] = rec["speedup_vs_foreach"] = None
        if not _ok(rec):
            continue
        rec["gbps"] = rec["bytes_per_param"] * rec["n_params"] / (rec["median_ms"] * 1e-3) / 1e9
        if copy:
            rec["frac_copy"] = rec["gbps"] / copy
        if rec["online_dtype"] in foreach:
            rec["speedup_vs_foreach"] = foreach[rec["online_dtype"]] / rec["median_ms"]
    return data


# --------------------------------------------------------------------------- text helpers
def _fmt_ms(rec: dict | None) -> str:
    if rec is None:
        return ""
    if not _ok(rec):
        return STATUS_CELL.get(rec.get("status"), "?")
    ms = rec["median_ms"]
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _fmt_mb(rec: dict | None) -> str:
    if rec is None or not _ok(rec) or rec.get("peak_mb") is None:
        return STATUS_CELL.get(rec.get("status"), "") if rec and not _ok(rec) else ""
    return f"{rec['peak_mb']:.0f}" if rec["peak_mb"] >= 10 else f"{rec['peak_mb']:.1f}"


def _fmt_num(value: float) -> str:
    """Three significant digits, no exponent for the usual ranges (0.0123, 1.23, 123)."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _fmt_pct(frac: float | None) -> str:
    """A fraction as a percentage: 2 significant digits below 10 % (0.31%, 4.2%)."""
    if frac is None:
        return ""
    pct = 100 * frac
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def _fmt_floor(rec: dict | None) -> str:
    fl = (rec or {}).get("floor") or {}
    if not fl.get("ms"):
        return ""
    return f"{_fmt_num(fl['ms'])} {fl['bound']}"


def _fmt_x(value) -> str:
    return "" if value is None else f"{_fmt_num(value)}×"


def _geomean(values) -> float | None:
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _providers(recs) -> list[str]:
    seen = {r["provider"] for r in recs}
    return [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _groups(data: dict) -> dict:
    groups: dict = defaultdict(list)
    for rec in data.get("cases", []):
        groups[(rec["loss"], rec["mode"], rec["dtype"])].append(rec)
    return groups


# --------------------------------------------------------------------------- summary
def summary_rows(data: dict) -> list[list[str]]:
    rows = []
    for (loss, mode, dt), recs in _groups(data).items():
        grid = [r for r in recs if r.get("tag") != "memory"]
        for prov in _providers(grid):
            if prov.startswith("eager"):
                continue
            mine = [r for r in grid if r["provider"] == prov]
            ok = [r for r in mine if _ok(r) and r.get("speedup_vs_eager")]
            sp = [r["speedup_vs_eager"] for r in ok]
            frac = [r["frac_matmul"] for r in ok if r.get("frac_matmul") is not None]
            ff = [r["frac_floor"] for r in ok if r.get("frac_floor")]
            why = ""
            if not ok:
                reasons = {r.get("reason") or r.get("status") for r in mine if not _ok(r)}
                why = "; ".join(sorted(str(x) for x in reasons))[:90]
            elif mode != "fwd+bwd" and all(r.get("grad_in_forward") for r in ok):
                why = ("gradient formed in fwd (bwd only scales it): the fwd+bwd rows "
                       "compare like with like")
            rows.append([loss, mode, dt, prov, f"{len(ok)}/{len(mine)}",
                         _fmt_x(_geomean(sp)), _fmt_x(min(sp) if sp else None),
                         _fmt_x(max(sp) if sp else None),
                         _fmt_pct(max(frac)) if frac else "",
                         _fmt_pct(_geomean(ff)) if ff else "",
                         f"{_fmt_pct(min(ff))}–{_fmt_pct(max(ff))}" if ff else "", why])
    return rows


SUMMARY_HEADER = ["loss", "mode", "dtype", "provider", "cases ok", "geomean speed-up",
                  "min", "max", "best % of matmul peak", "geomean % of floor",
                  "% of floor min–max", "note"]


def _ceiling_lines(data: dict) -> list[str]:
    ceil = data.get("ceilings") or {}
    lines = []
    if ceil.get("copy"):
        c = ceil["copy"]
        lines.append(f"- copy ceiling: **{c['gbps']:.0f} GB/s** ({c['how']}, "
                     f"{c['bytes'] / 2**20:.0f} MiB)")
    for dt, m in (ceil.get("matmul") or {}).items():
        lines.append(f"- matmul ceiling ({dt}): **{_fmt_num(m['tflops'])} TFLOP/s** ({m['how']})")
    if ceil.get("launch"):
        la = ceil["launch"]
        lines.append(f"- launch floor: **{la['ms'] * 1e3:.1f} µs** per kernel ({la['how']}); a "
                     f"call needs at least {floors.MIN_LAUNCHES['fwd']} (fwd, bwd) or "
                     f"{floors.MIN_LAUNCHES['fwd+bwd']} (fwd+bwd)")
    if ceil.get("custom_op"):
        co = ceil["custom_op"]
        lines.append(f"- one custom op with a registered backward: **{co['fwd_ms'] * 1e3:.1f} µs** "
                     f"fwd, **{co['fwd_bwd_ms'] * 1e3:.1f} µs** fwd+bwd per call ({co['how']}): "
                     f"the fixed cost of a fused op before any arithmetic (not part of the floors)")
    return lines or ["- ceilings not measured"]


def _ema_rows(data: dict) -> list[list[str]]:
    rows = []
    for rec in data.get("ema", []):
        ok = _ok(rec)
        rows.append([rec["model"], f"{rec['n_params'] / 1e6:.1f} M / {rec['n_tensors']}",
                     f"{rec['online_dtype']}→{rec['target_dtype']}", rec["provider"],
                     _fmt_ms(rec), f"{rec['gbps']:.0f}" if ok else "",
                     f"{100 * rec['frac_copy']:.0f}%" if ok and rec.get("frac_copy") else "",
                     _fmt_x(rec.get("speedup_vs_foreach")),
                     "" if ok else (rec.get("reason") or "")[:80]])
    return rows


EMA_HEADER = ["params", "values / tensors", "online→target", "provider", "median ms",
              "GB/s", "% of copy", "vs foreach", "note"]


def _memory_rows(data: dict) -> list[list[str]]:
    rows = []
    for rec in data.get("cases", []):
        if rec.get("tag") == "memory":
            rows.append([rec["loss"], str(rec["B"]), str(rec["k"]), rec["dtype"], rec["provider"],
                         _fmt_ms(rec), _fmt_mb(rec),
                         "" if _ok(rec) else (rec.get("reason") or "")[:100]])
    return rows


# --------------------------------------------------------------------------- issue 21 targets
TARGET_DTYPE, TARGET_MODE = "bf16", "fwd+bwd"
SMALL_B, SMALL_K, SMALL_MS = 1024, 512, 0.25  # fwd+bwd <= 0.25 ms for B <= 1024, k <= 512
BIG_FLOPS, BIG_FRAC = 50e9, 0.5  # >= 50 GFLOP of model work at >= 50 % of the matmul ceiling
GEOMEAN_VS_COMPILE = {"spectral": 1.5, "minc": 1.5, "mio": 2.0}


def _case_tag(rec: dict) -> str:
    return f"B={rec['B']}, k={rec['k']}"


def target_rows(data: dict) -> list[list[str]]:
    """Issue 21's speed targets (bf16, fwd+bwd, the benchmark grid), one row per target and
    loss: ``[target, loss, verdict, detail]`` with the verdict ``met``, ``NOT met`` or
    ``no data``, and the worst case named.  Needs :func:`add_derived`."""
    rows = []
    grid = [r for r in data.get("cases", []) if r.get("tag") != "memory"
            and r["dtype"] == TARGET_DTYPE and r["mode"] == TARGET_MODE]
    for loss in sorted({r["loss"] for r in grid}):
        recs = [r for r in grid if r["loss"] == loss]
        mine = {(r["B"], r["k"]): r for r in recs if r.get("family") == "minc_kernels"}
        if not mine:
            continue
        ok = {key: r for key, r in mine.items() if _ok(r)}
        others: dict = defaultdict(dict)  # shape -> {"eager": best ms, "compile": ms}
        for r in recs:
            fam = r.get("family")
            if fam in ("eager", "compile") and _ok(r):
                shape = others[(r["B"], r["k"])]
                shape[fam] = min(shape.get(fam, r["median_ms"]), r["median_ms"])

        def verdict(passed: bool | None) -> str:
            return "no data" if passed is None else ("met" if passed else "NOT met")

        # 1. >= 1.0x the better of eager and torch.compile on every case
        ratios = [(min(others[key].values()) / r["median_ms"], r) for key, r in ok.items()
                  if others.get(key)]
        if ratios:
            worst = min(ratios, key=lambda x: x[0])
            failed = sum(1 for x, _ in ratios if x < 1.0)
            detail = (f"{len(ratios) - failed}/{len(ratios)} cases; worst "
                      f"{_fmt_x(worst[0])} at {_case_tag(worst[1])}")
            rows.append([">= 1.0x the better of eager and compile, every case", loss,
                         verdict(failed == 0), detail])
        else:
            rows.append([">= 1.0x the better of eager and compile, every case", loss,
                         verdict(None), ""])
        # 2. geomean over torch.compile (spectral, MINC >= 1.5x; MIO >= 2x)
        if loss in GEOMEAN_VS_COMPILE:
            want = GEOMEAN_VS_COMPILE[loss]
            sp = [others[key]["compile"] / r["median_ms"] for key, r in ok.items()
                  if "compile" in others.get(key, {})]
            g = _geomean(sp)
            rows.append([f"geomean >= {_fmt_num(want)}x torch.compile", loss,
                         verdict(None if g is None else g >= want),
                         "" if g is None else f"{_fmt_x(g)} over {len(sp)} cases"])
        # 3. cases with >= 50 GFLOP of model work at >= 50 % of the matmul ceiling
        big = [r for r in ok.values() if (r.get("flops") or 0) >= BIG_FLOPS
               and r.get("frac_matmul") is not None]
        if big:
            worst = min(big, key=lambda r: r["frac_matmul"])
            failed = sum(1 for r in big if r["frac_matmul"] < BIG_FRAC)
            rows.append([f">= {BIG_FRAC:.0%} of the matmul ceiling at >= 50 GFLOP", loss,
                         verdict(failed == 0),
                         f"{len(big) - failed}/{len(big)} cases; worst "
                         f"{_fmt_pct(worst['frac_matmul'])} at {_case_tag(worst)}"])
        # 4. fwd+bwd <= 0.25 ms for B <= 1024, k <= 512
        small = [r for key, r in mine.items() if key[0] <= SMALL_B and key[1] <= SMALL_K]
        if small:
            timed = [r for r in small if _ok(r)]
            worst = max(timed, key=lambda r: r["median_ms"]) if timed else None
            failed = sum(1 for r in timed if r["median_ms"] > SMALL_MS) + len(small) - len(timed)
            rows.append([f"fwd+bwd <= {SMALL_MS} ms at B <= {SMALL_B}, k <= {SMALL_K}", loss,
                         verdict(failed == 0),
                         f"{len(small) - failed}/{len(small)} cases"
                         + (f"; slowest {_fmt_ms(worst)} ms at {_case_tag(worst)}"
                            if worst else "")])
    return rows


TARGET_HEADER = ["target (issue 21; bf16, fwd+bwd)", "loss", "verdict", "detail"]


def summary_text(data: dict) -> str:
    meta = data.get("meta", {})
    lines = [f"== benchmark summary: {meta.get('device')} | torch {meta.get('torch')} | "
             f"triton {meta.get('triton')} | commit {str(meta.get('git_commit'))[:10]}"]
    lines += _ceiling_lines(data)
    if data.get("ema"):
        lines += ["", "EMA:"] + _table(EMA_HEADER, _ema_rows(data))
    mem = _memory_rows(data)
    if mem:
        lines += ["", "memory case:"] + _table(["loss", "B", "k", "dtype", "provider", "ms",
                                                "peak MB", "note"], mem)
    lines += ["", "losses (speed-up vs the best eager provider):"]
    lines += _table(SUMMARY_HEADER, summary_rows(data))
    targets = target_rows(data)
    if targets:
        lines += ["", "issue 21 targets:"] + _table(TARGET_HEADER, targets)
    return "\n".join(lines)


# --------------------------------------------------------------------------- markdown
def markdown(data: dict, plots: list[str]) -> str:
    meta = data.get("meta", {})
    settings = data.get("settings", {})
    lines = [f"# minc_kernels benchmarks: {meta.get('device')}", ""]
    lines += [f"- date (UTC): {meta.get('date_utc')}; wall time {meta.get('wall_s')} s"
              + (f"; **interrupted**: {meta['interrupted']}" if meta.get("interrupted") else ""),
              f"- torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
              f"python {meta.get('python')}",
              f"- load average (1/5/15 min) at start {meta.get('load_average_start')}, at end "
              f"{meta.get('load_average_end')} ({meta.get('cpu_threads')} CPU threads)",
              f"- git commit `{meta.get('git_commit')}`"
              + (" (uncommitted changes)" if meta.get("git_dirty") else ""),
              f"- settings: `{json.dumps(settings)}`",
              f"- triton ops: `{json.dumps(meta.get('ops'))}`; EMA extension: "
              f"`{meta.get('extension')}`"]
    lines += _ceiling_lines(data)
    lines += ["", "Times are medians (ms); peak MB is the CUDA allocator's peak above the "
              "inputs (blank on the CPU); × is the speed-up over the best eager provider; "
              "TFLOP/s uses the flop model in `benchmarks/floors.py`, % is of the matmul "
              "ceiling (blank where the mode does no matmul work: the `bwd` of a provider "
              "that formed the gradient in the forward). Floor = the largest of flops / "
              "matmul ceiling (`flop`), compulsory bytes / copy ceiling (`byte`) and "
              "launches × launch floor (`launch`), for the work the provider's formulation "
              "does (`benchmarks/floors.py`); % of floor = floor / measured time (100% = at "
              "the floor). `–` skipped (see `reason` in results.json), OOM out of memory.", ""]
    lines += ["## Summary", ""] + _table(SUMMARY_HEADER, summary_rows(data))
    targets = target_rows(data)
    if targets:
        lines += ["", "## Issue 21 targets", "",
                  "bf16, fwd+bwd, the benchmark grid: `minc_kernels` against the better of "
                  "the eager providers and `torch.compile` per case; its geomean over "
                  "`torch.compile`; the share of the measured matmul ceiling where the model "
                  f"work is at least {BIG_FLOPS / 1e9:.0f} GFLOP; the time at "
                  f"B <= {SMALL_B}, k <= {SMALL_K} (a case that did not run counts as "
                  "not met).", ""] + _table(TARGET_HEADER, targets)
    if data.get("ema"):
        lines += ["", "## EMA update (BYOL/MINC target network)", "",
                  "GB/s counts 12 bytes per parameter for fp32 online (read target, read "
                  "online, write target) and 10 for bf16 online.", ""]
        lines += _table(EMA_HEADER, _ema_rows(data))
    mem = _memory_rows(data)
    if mem:
        lines += ["", "## Memory case", ""]
        lines += _table(["loss", "B", "k", "dtype", "provider", "ms", "peak MB", "note"], mem)
    for (loss, mode, dt), recs in _groups(data).items():
        grid = [r for r in recs if r.get("tag") != "memory"]
        if not grid:
            continue
        provs = _providers(grid)
        fast = [p for p in provs if not p.startswith("eager")]
        has_mb = any(r.get("peak_mb") is not None for r in grid)  # never on the CPU
        mb_provs = provs if has_mb else []
        header = (["B", "k"] + [f"{p} ms" for p in provs] + [f"{p} MB" for p in mb_provs]
                  + [f"{p} ×" for p in fast] + [f"{p} TFLOP/s (%)" for p in fast]
                  + [f"{p} floor ms" for p in fast] + [f"{p} % of floor" for p in fast])
        by_shape: dict = defaultdict(dict)
        for r in grid:
            by_shape[(r["B"], r["k"])][r["provider"]] = r
        rows = []
        for (b, k) in sorted(by_shape):
            cell = by_shape[(b, k)]
            row = [str(b), str(k)] + [_fmt_ms(cell.get(p)) for p in provs]
            row += [_fmt_mb(cell.get(p)) for p in mb_provs]
            row += [_fmt_x((cell.get(p) or {}).get("speedup_vs_eager")) for p in fast]
            for p in fast:
                r = cell.get(p) or {}
                if r.get("tflops") is None:
                    row.append("")
                else:
                    frac = r.get("frac_matmul")
                    row.append(_fmt_num(r["tflops"]) + (f" ({100 * frac:.0f}%)" if frac else ""))
            row += [_fmt_floor(cell.get(p)) for p in fast]
            row += [_fmt_pct((cell.get(p) or {}).get("frac_floor")) for p in fast]
            rows.append(row)
        lines += ["", f"## {loss}, {mode}, {dt}", ""] + _table(header, rows)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots
def _legend(axes, fontsize: int) -> None:
    """Legend on the panel with the most labelled lines (the last panel may be empty)."""
    best = max(axes, key=lambda ax: len(ax.get_legend_handles_labels()[1]))
    if best.get_legend_handles_labels()[1]:
        best.legend(fontsize=fontsize)


def _tidy_axes(ax, xs) -> None:
    """Plain numbers on log axes: the B values on x, ``%g`` on y (minor labels if < 1.5 decades)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    if xs:
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sorted(xs), [str(x) for x in sorted(xs)], fontsize=7)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if lo > 0 and hi / lo < 30 else NullFormatter())
    ax.tick_params(axis="y", which="both", labelsize=7)


def make_plots(data: dict, out: Path) -> list[str]:
    """``time_<loss>_<mode>_<dtype>.png`` (ms vs B, one panel per k), ``speedup_<loss>_<dtype>.png``
    and ``ema.png``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    groups = _groups(data)
    for (loss, mode, dt), recs in groups.items():
        grid = [r for r in recs if r.get("tag") != "memory"]
        ks = sorted({r["k"] for r in grid})
        if not ks:
            continue
        fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.4), squeeze=False)
        for ax, k in zip(axes[0], ks):
            for prov in _providers(grid):
                pts = sorted((r["B"], r["median_ms"]) for r in grid
                             if r["k"] == k and r["provider"] == prov and _ok(r))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"k = {k}")
            ax.set_xlabel("B")
            ax.grid(True, which="both", alpha=0.3)
            _tidy_axes(ax, {r["B"] for r in grid if r["k"] == k})
        axes[0][0].set_ylabel("median ms")
        _legend(axes[0], 8)
        fig.suptitle(f"{loss} {mode} ({dt}), {data['meta'].get('device')}", fontsize=10)
        fig.tight_layout()
        name = f"time_{loss}_{mode.replace('+', '_')}_{dt}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    by_loss: dict = defaultdict(list)
    for (loss, mode, dt), recs in groups.items():
        by_loss[(loss, dt)].append((mode, recs))
    for (loss, dt), items in by_loss.items():
        fig, axes = plt.subplots(1, len(items), figsize=(4 * len(items), 3.4), squeeze=False)
        drew = False
        for ax, (mode, recs) in zip(axes[0], items):
            for prov in ("compile", "minc_kernels"):
                for k in sorted({r["k"] for r in recs if r.get("tag") != "memory"}):
                    pts = sorted((r["B"], r["speedup_vs_eager"]) for r in recs
                                 if r["provider"] == prov and r["k"] == k
                                 and r.get("speedup_vs_eager") and r.get("tag") != "memory")
                    if pts:
                        drew = True
                        ax.plot(*zip(*pts), marker="o" if prov == "minc_kernels" else "x",
                                linestyle="-" if prov == "minc_kernels" else ":",
                                label=f"{prov} k={k}")
            ax.axhline(1.0, color="k", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(mode)
            ax.set_xlabel("B")
            ax.grid(True, which="both", alpha=0.3)
            _tidy_axes(ax, {r["B"] for r in recs if r.get("tag") != "memory"})
        axes[0][0].set_ylabel("speed-up vs best eager")
        _legend(axes[0], 7)
        if not drew:
            plt.close(fig)
            continue
        fig.suptitle(f"{loss} ({dt}) speed-up, {data['meta'].get('device')}", fontsize=10)
        fig.tight_layout()
        name = f"speedup_{loss}_{dt}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    ema = [r for r in data.get("ema", []) if _ok(r)]
    if ema:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        labels = [f"{r['provider']}\n{r['online_dtype']}" for r in ema]
        ax.bar(range(len(ema)), [r["gbps"] for r in ema])
        ax.set_xticks(range(len(ema)), labels, fontsize=6, rotation=25)
        copy = ((data.get("ceilings") or {}).get("copy") or {}).get("gbps")
        if copy:
            ax.axhline(copy, color="r", linestyle="--", label=f"copy ceiling {copy:.0f} GB/s")
            ax.legend(fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"EMA update, {ema[0]['model']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "ema.png", dpi=90)
        plt.close(fig)
        names.append("ema.png")
    return names


def existing_plots(data: dict, out: Path) -> list[str]:
    """The plots :func:`make_plots` would write that are already in ``out``, in its order
    (``--no-plots`` on a results folder keeps and links the plots it has)."""
    groups = _groups(data)
    names = [f"time_{loss}_{mode.replace('+', '_')}_{dt}.png" for (loss, mode, dt) in groups]
    names += list(dict.fromkeys(f"speedup_{loss}_{dt}.png" for (loss, _, dt) in groups))
    names.append("ema.png")
    return [n for n in names if (out / n).exists()]


def write_report(data: dict, out: Path, plots: bool = True) -> None:
    add_derived(data)
    names = [] if plots else existing_plots(data, out)
    if plots:
        try:
            names = make_plots(data, out)
        except Exception as exc:  # noqa: BLE001 - a table without plots beats nothing
            print(f"plots failed: {type(exc).__name__}: {exc}")
    (out / "results.md").write_text(markdown(data, names))


def ab_text(a: dict, b: dict, label_a: str, label_b: str) -> str:
    """Markdown: the cases both runs measured (same loss, B, k, dtype, mode, provider),
    side by side, with the ratio of medians (A / B: > 1 means B is faster) and each one's
    % of floor; a geomean of the ratio per loss, mode and provider first."""
    add_derived(a)
    add_derived(b)

    def key(r):
        return (r["loss"], r["mode"], r["dtype"], r["provider"], r["B"], r["k"])

    bs = {key(r): r for r in b.get("cases", []) if _ok(r)}
    pairs = [(r, bs[key(r)]) for r in a.get("cases", []) if _ok(r) and key(r) in bs]
    groups: dict = defaultdict(list)
    for ra, rb in pairs:
        groups[key(ra)[:4]].append(ra["median_ms"] / rb["median_ms"])
    lines = [f"# A/B: {label_a} vs {label_b}", "",
             f"- A = {label_a}: {a.get('meta', {}).get('device')}, commit "
             f"`{str(a.get('meta', {}).get('git_commit'))[:10]}`, {a.get('meta', {}).get('date_utc')}",
             f"- B = {label_b}: {b.get('meta', {}).get('device')}, commit "
             f"`{str(b.get('meta', {}).get('git_commit'))[:10]}`, {b.get('meta', {}).get('date_utc')}",
             f"- {len(pairs)} cases measured by both; A / B = ratio of medians (> 1: B faster)",
             "", "| loss | mode | dtype | provider | cases | geomean A / B | min | max |",
             "|---|---|---|---|---|---|---|---|"]
    for (loss, mode, dt, prov), rs in groups.items():
        lines.append(f"| {loss} | {mode} | {dt} | {prov} | {len(rs)} | {_fmt_x(_geomean(rs))} "
                     f"| {_fmt_x(min(rs))} | {_fmt_x(max(rs))} |")
    lines += ["", "| loss | mode | dtype | provider | B | k | A ms | B ms | A / B | A % of floor "
              "| B % of floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ra, rb in pairs:
        lines.append(f"| {ra['loss']} | {ra['mode']} | {ra['dtype']} | {ra['provider']} | "
                     f"{ra['B']} | {ra['k']} | {_fmt_ms(ra)} | {_fmt_ms(rb)} | "
                     f"{_fmt_x(ra['median_ms'] / rb['median_ms'])} | "
                     f"{_fmt_pct(ra.get('frac_floor'))} | {_fmt_pct(rb.get('frac_floor'))} |")
    return "\n".join(lines) + "\n"


def ab_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report --ab")
    p.add_argument("a", type=Path, help="folder A (results.json)")
    p.add_argument("b", type=Path, help="folder B (results.json)")
    p.add_argument("--labels", default=None, help="A,B labels (default: the folder names)")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown here")
    args = p.parse_args(argv)
    la, lb = (args.labels.split(",", 1) if args.labels else (args.a.name, args.b.name))
    data = []
    for d in (args.a, args.b):
        x = json.loads((d / "results.json").read_text())
        attach_launch_floor(x, d)
        data.append(x)
    text = ab_text(data[0], data[1], la, lb)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--ab"]:
        return ab_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                epilog="python -m benchmarks.report --ab DIR_A DIR_B "
                                       "[--labels A,B] [--out AB.md]: the cases both runs "
                                       "measured, side by side")
    p.add_argument("dir", type=Path, help="folder holding results.json")
    p.add_argument("--no-plots", action="store_true",
                   help="draw no plots (results.md links the plots already in DIR)")
    p.add_argument("--summary-only", action="store_true", help="print the summary, write nothing")
    p.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = p.parse_args(argv)
    data = json.loads((args.dir / "results.json").read_text())
    attach_launch_floor(data, args.dir)
    if args.summary_only:
        add_derived(data)
    else:
        write_report(data, args.dir, plots=not args.no_plots)
        (args.dir / "results.json").write_text(json.dumps(data, indent=1, default=str))
    if not args.quiet:
        print(summary_text(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
