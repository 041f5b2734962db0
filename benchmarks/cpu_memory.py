"""Extra memory and time of the losses on the CPU, forward + backward (issue 15).

For each case a fresh subprocess builds the inputs (k = 128, fp32, ``requires_grad``), warms
the provider up on a tiny batch (so the thread pool's and MKL's one-off buffers are not
counted), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs forward +
backward once and reads ``VmHWM - VmRSS before``: the peak resident memory the call added.
It then repeats the call while the case's time budget lasts and reports the median and the
minimum wall time of all calls.  Cases whose memory, extrapolated from a smaller batch of
the same provider (× (B/B_small)²), would exceed ``--max-gib`` are skipped and say so.

Providers:
* MIO: ``reference.mio_loss`` (the oracle), a hand-written eager version (below, as a user
  would write it) and ``ops.mio_cpu.mio_loss_blocked`` (the blocked path), plus a block-size
  sweep of the blocked path at B = 8192;
* spectral: ``reference.spectral_loss`` with ``algorithm`` auto, gram and pairwise;
* MINC: the batch moment, the bias-corrected EMA of M and ``reference.minc_loss``.

    .venv/bin/python benchmarks/cpu_memory.py [--threads 2] [--budget-s 60] [--out DIR]

Writes ``results.json`` and ``results.md`` under ``benchmarks/results/cpu-memory-<date>/``.
The machine may be shared: the load average before and after each case is recorded.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = Path(__file__).resolve().parent / "results"
K = 128
GIB = float(1 << 30)


# --------------------------------------------------------------------------- providers
def mio_handwritten(z1, z2, tp, tn, lam):
    """MIO as a user would write it in eager PyTorch (the 2B×2B matrix, no index masks)."""
    import torch
    import torch.nn.functional as F
    b = z1.shape[0]
    n = 2 * b
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = z @ z.T
    pos = torch.cat([torch.diagonal(s, b), torch.diagonal(s, -b)])
    neg = F.softplus(s / tn).masked_fill(torch.eye(n, dtype=torch.bool), 0).sum()
    neg = neg - F.softplus(pos / tn).sum()
    return F.softplus(-pos / tp).mean() + neg / (n * (n - 2)) + lam * F.mse_loss(z[:b], z[b:])


def make_provider(name: str, block_rows: int | None, block_cols: int | None = None):
    """(loss function of (z1, z2), inputs factory note)."""
    import torch
    from minc_kernels import reference
    from minc_kernels.ops import mio_cpu

    if name == "mio/reference":
        return lambda a, b: reference.mio_loss(a, b, 0.5, 0.5, 1.0)
    if name == "mio/handwritten":
        return lambda a, b: mio_handwritten(a, b, 0.5, 0.5, 1.0)
    if name == "mio/blocked":
        return lambda a, b: mio_cpu.mio_loss_blocked(a, b, 0.5, 0.5, 1.0, block_rows=block_rows,
                                                            block_cols=block_cols)
    if name.startswith("spectral/"):
        algo = name.split("/", 1)[1]
        return lambda a, b: reference.spectral_loss(a, b, 1.0, True, algo)
    if name == "minc/reference":
        moment = torch.zeros(K, K)

        def minc(p, t):
            c = reference.minc_batch_moment_sum(t) / t.shape[0]
            _, m = reference.minc_ema_moment(moment, c, 0.99, 0)
            return reference.minc_loss(p, t, m)
        return minc
    raise ValueError(f"unknown provider {name!r}")


# --------------------------------------------------------------------------- worker
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(case: dict) -> dict:
    import torch
    torch.set_num_threads(case["threads"])
    fn = make_provider(case["provider"], case.get("block_rows"), case.get("block_cols"))
    def inputs(b):
        g = torch.Generator().manual_seed(0)
        z1 = torch.randn(b, K, generator=g)
        z2 = (z1 + 0.7 * torch.randn(b, K, generator=g))
        return z1.requires_grad_(), z2.requires_grad_()

    def step(z1, z2):
        loss = fn(z1, z2)
        loss.backward()
        z1.grad = z2.grad = None
        return loss

    step(*inputs(4))  # warm-up: lazy imports, thread pool, MKL buffers
    z1, z2 = inputs(case["b"])
    # reset the peak first, then read the baseline: memory freed between the two reads
    # (the allocator trimming, another thread) would otherwise give a negative "extra"
    reset = _reset_peak()
    rss0 = _proc_status_kib("VmRSS")
    if not reset:
        import resource
        hwm0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss = step(z1, z2)
    times = [time.perf_counter() - t0]
    if reset:
        extra_kib = _proc_status_kib("VmHWM") - rss0
    else:  # ru_maxrss is a lifetime peak: only a lower bound when the warm-up peaked higher
        import resource
        extra_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(hwm0, rss0)
    start = time.perf_counter()
    budget = case["budget_s"] - times[0]
    while len(times) < case["max_reps"] and time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        step(z1, z2)
        times.append(time.perf_counter() - t0)
    return {
        "extra_gib": extra_kib * 1024 / GIB,
        "peak_method": "VmHWM after clear_refs" if reset else "ru_maxrss delta (lower bound)",
        "first_s": times[0],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "reps": len(times),
        "loss": float(loss.detach()),
    }


# --------------------------------------------------------------------------- driver
def run_case(case: dict, timeout_s: float) -> dict:
    rec = dict(case)
    rec["load_before"] = list(os.getloadavg())
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)],
                              capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        rec.update(status="timeout", reason=f"no result within {timeout_s:.0f} s")
    else:
        if proc.returncode == 0:
            rec.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rec["status"] = "ok"
        else:
            rec.update(status="error", reason=proc.stderr.strip().splitlines()[-1][:300]
                       if proc.stderr.strip() else f"exit code {proc.returncode}")
    rec["case_wall_s"] = time.perf_counter() - t0
    rec["load_after"] = list(os.getloadavg())
    return rec


def plan(args) -> list[dict]:
    cases = []
    base = {"threads": args.threads, "budget_s": args.budget_s, "max_reps": args.max_reps}
    for b in (256, 8192, 32768):
        for p in ("mio/reference", "mio/handwritten", "mio/blocked"):
            cases.append(dict(base, provider=p, b=b))
    for b in (8192, 32768):
        for p in ("spectral/auto", "spectral/gram", "spectral/pairwise", "minc/reference"):
            cases.append(dict(base, provider=p, b=b))
    # Tile shapes at B = 8192 (the default there is 2048 rows × whole rows of S): square
    # tiles (many small ops) against strips of whole rows (few large ones).
    for rows, cols in ((512, 512), (1024, 1024), (512, None), (1024, None), (4096, None)):
        cases.append(dict(base, provider="mio/blocked", b=8192, block_rows=rows,
                          block_cols=cols, sweep=True))
    if args.only:
        cases = [c for c in cases if any(o in c["provider"] for o in args.only)]
    return cases


def machine() -> dict:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_kib * 1024 / GIB,
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit}


def _fmt_s(rec):
    if rec.get("status") != "ok":
        return "–"
    return f"{rec['median_s']:.3g} (min {rec['min_s']:.3g}, n={rec['reps']})"


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"# CPU memory and time of the losses, forward + backward ({data['threads']} threads)",
        "",
        f"- date (UTC): {data['date']}; {m['cpu']}, {m['cores']} cores, {m['mem_gib']:.0f} GiB; "
        f"torch {m['torch']}, python {m['python']}; git commit `{m['commit']}`",
        f"- load average (1/5/15 min) at start {data['load_start']}, at end {data['load_end']}: "
        "the machine is shared with other engineers' jobs, so wall times depend on the load; "
        "each row gives the 1-min load around its case (extra memory does not depend on it)",
        f"- k = {K}, float32 inputs; each case in a fresh process; extra memory = peak RSS of the "
        "first forward+backward minus the RSS before it (inputs and a tiny-batch warm-up "
        "excluded); time = median (min, count) of the repeats within a "
        f"{data['budget_s']:.0f} s budget per case, first call included",
        f"- regenerate: `{data['command']}`",
        "",
        "| loss | provider | B | extra memory | fwd+bwd s | load 1-min before/after | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in data["cases"]:
        loss, prov = r["provider"].split("/", 1)
        if r.get("block_rows"):
            prov += f" ({r['block_rows']} rows × {r.get('block_cols') or 'N - r0'} cols)"
        mem = f"{r['extra_gib']:.3g} GiB" if r.get("status") == "ok" else "–"
        note = "" if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason', '')}"
        lines.append(f"| {loss} | {prov} | {r['b']} | {mem} | {_fmt_s(r)} | "
                     f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} | {note} |")
    lines += ["", "## Targets (issue 15) and B×B checks", ""]
    lines += [f"- {t}" for t in data["targets"]]
    lines.append("")
    return "\n".join(lines)


def _find(cases, provider, b):
    for r in cases:
        if r["provider"] == provider and r["b"] == b and not r.get("block_rows"):
            return r
    return None


def targets(cases) -> list[str]:
    out = []

    def ok(r):
        return r is not None and r.get("status") == "ok"
    for b in (8192, 32768):
        r = _find(cases, "mio/blocked", b)
        if ok(r):
            out.append(f"extra memory < 1 GiB at B = {b}: {r['extra_gib']:.3g} GiB -> "
                       f"{'met' if r['extra_gib'] < 1.0 else 'NOT met'}")
    for b, other in ((8192, "mio/handwritten"), (256, "mio/reference")):
        r, o = _find(cases, "mio/blocked", b), _find(cases, other, b)
        if ok(r) and ok(o):
            name = other.split("/")[1]
            out.append(f"B = {b}, blocked vs {name}: median {r['median_s']:.3g} s vs "
                       f"{o['median_s']:.3g} s ({o['median_s'] / r['median_s']:.2f}x), min "
                       f"{r['min_s']:.3g} vs {o['min_s']:.3g} s -> "
                       f"{'met' if r['median_s'] <= o['median_s'] else 'NOT met'}")
    for prov in ("spectral/auto", "spectral/gram", "spectral/pairwise", "minc/reference"):
        for b in (8192, 32768):
            r = _find(cases, prov, b)
            if r is None:
                continue
            bxb = b * b * 4 / GIB
            if ok(r):
                big = r["extra_gib"] >= 0.5 * bxb
                verdict = "allocates about a B×B fp32 matrix or more" if big else "no B×B matrix"
                out.append(f"{prov} at B = {b}: {r['extra_gib']:.3g} GiB extra (B×B fp32 = "
                           f"{bxb:.3g} GiB): {verdict}")
            elif r.get("status") == "skipped":
                out.append(f"{prov} at B = {b}: skipped, {r['reason']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=60.0, help="timing budget per case")
    ap.add_argument("--max-reps", type=int, default=30)
    ap.add_argument("--timeout-s", type=float, default=400.0, help="kill a case after this")
    ap.add_argument("--max-gib", type=float, default=12.0,
                    help="skip a case whose extrapolated extra memory exceeds this")
    ap.add_argument("--only", nargs="*", help="providers containing one of these strings")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--from-json", type=Path, help="re-render results.md from this results.json")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        data["targets"] = targets(data["cases"])
        (args.from_json.parent / "results.md").write_text(markdown(data))
        return 0

    start = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or RESULTS_ROOT / f"cpu-memory-{start.date().isoformat()}"
    data = {"date": start.isoformat(timespec="seconds"), "threads": args.threads,
            "budget_s": args.budget_s, "machine": machine(), "load_start": list(os.getloadavg()),
            "command": " ".join([".venv/bin/python benchmarks/cpu_memory.py",
                                 *(argv or sys.argv[1:])]),
            "cases": []}
    for case in plan(args):
        # Extrapolate from the same provider at the largest smaller B already measured.
        smaller = [r for r in data["cases"] if r["provider"] == case["provider"]
                   and r.get("block_rows") == case.get("block_rows")
                   and r.get("block_cols") == case.get("block_cols") and r["b"] < case["b"]
                   and r.get("status") == "ok"]
        if smaller:
            ref = max(smaller, key=lambda r: r["b"])
            est = ref["extra_gib"] * (case["b"] / ref["b"]) ** 2
            if est > args.max_gib:
                rec = dict(case, status="skipped", est_gib=est,
                           load_before=list(os.getloadavg()), load_after=list(os.getloadavg()),
                           reason=f"would need ~{est:.0f} GiB ({ref['extra_gib']:.2f} GiB at "
                                  f"B={ref['b']} x {(case['b'] / ref['b']) ** 2:.0f})")
                data["cases"].append(rec)
                print(json.dumps(rec), flush=True)
                continue
        rec = run_case(case, args.timeout_s)
        data["cases"].append(rec)
        print(json.dumps(rec), flush=True)
    data["load_end"] = list(os.getloadavg())
    data["targets"] = targets(data["cases"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "results.md").write_text(markdown(data))
    print(f"wrote {out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
