"""Study 3 (issue 8): linear-probe accuracy vs batch size at a fixed budget.

``python -m minc_train.studies.batch_size [--budget cpu|gpu] [--threads 1] [--seeds 2]``

Pre-trains spectral, MINC (ordering standard and gha), MIO, Barlow Twins and VICReg on Fashion-MNIST at each
batch size with the same number of images seen (``epochs x epoch_size``), through the
training program (``minc_train.cli.resolve_config`` + ``Trainer``), then fits a
linear probe (L-BFGS logistic regression on standardised backbone features, train split ->
the 10k test split).  Raw-pixel and random-init probes are computed once per seed.

Resumable: each finished run is saved to ``<out>/runs/<run>.json`` as soon as it ends and
is skipped on restart; an unfinished run continues from its last epoch checkpoint in
``--work-dir``.  Writes ``results.json``, ``table.md`` and ``accuracy_vs_batch.png``.

Learning rate across batch sizes (``--budget cpu``): AdamW, base lr 1e-3 at batch 256,
scaled by ``sqrt(batch/256)`` (``--lr-scaling sqrt``): 5e-4 at 64, 2e-3 at 1024.  The
training program's default linear rule (x batch/256) is the SGD rule; for Adam-type
optimisers the square-root rule is the one that keeps the update noise matched
(Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient algorithms"),
and linear scaling would give AdamW 4e-3 at 1024 (and 2.5e-4 at 64, i.e. undertrained at
this short budget).  ``--budget gpu`` keeps each method's GPU recipe (LARS/SGD with linear
scaling, MIO unscaled), as the papers do.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

from minc_train.plots import pyplot, save_figure
from minc_train.studies._common import RESULTS, ROOT, comma_list, mean_std, write_json

DEFAULT_OUT = os.path.join(RESULTS, "batch_size")
DEFAULT_WORK = os.path.join(ROOT, "runs", "studies", "batch_size")

# method label -> training-program options
METHODS = {"spectral": ["--method", "spectral"],
           "minc": ["--method", "minc", "--ordering", "standard"],
           "minc-gha": ["--method", "minc", "--ordering", "gha"],
           "mio": ["--method", "mio"],
           "barlow": ["--method", "barlow"],
           "vicreg": ["--method", "vicreg"]}
LABELS = {"spectral": "spectral contrastive", "minc": "MINC (standard)", "minc-gha": "MINC (GHA ordering)",
          "mio": "MIO", "barlow": "Barlow Twins", "vicreg": "VICReg"}

# Budgets: the same images seen at every batch size (epochs x epoch_size; epoch_size is a
# multiple of 1024 so every batch size uses all of it).  CPU: measured ~1.1-1.3 ms per image
# per training step for the width-16 conv net on one thread (MINC slowest), so a run is about
# 45-60 s of training + ~10 s of probe, 24 runs ~30 min on one idle thread.
BUDGETS = {
    "cpu": dict(preset="cpu", args=["--arch", "convnet", "--width", "16", "--pool", "2",
                                    "--lr-scaling", "sqrt", "--warmup-epochs", "0.5"],
                epochs=4, epoch_size=10240, probe_train=10000, probe_eval=5000, probe_iters=100),
    "gpu": dict(preset="gpu", args=["--arch", "resnet18"],
                epochs=50, epoch_size=0, probe_train=0, probe_eval=0, probe_iters=200),
    # for tests: a few steps on whatever --data-dir holds
    "quick": dict(preset="cpu", args=["--arch", "convnet", "--width", "4", "--pool", "1",
                                      "--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "16",
                                      "--lr-scaling", "sqrt", "--knn-bank", "32", "--knn-queries", "16",
                                      "--knn-k", "3"],
                  epochs=1, epoch_size=32, probe_train=48, probe_eval=24, probe_iters=5),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minc_train.studies.batch_size", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: width-16 conv net, 4 x 10240 images per run (~30 min for 24 runs on 1 "
                   "thread); gpu: ResNet-18, 50 epochs of 60k images, each method's GPU recipe")
    p.add_argument("--quick", action="store_true", help="a few steps per run (for tests)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--batch-sizes", default="64,256,1024", help="comma-separated (default 64,256,1024)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per method x batch size (>= 1)")
    p.add_argument("--epochs", type=int, help="override the budget's epochs")
    p.add_argument("--epoch-size", type=int, help="override the budget's images per epoch")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--data-dir", help="Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (JSON, table, PNG, per-run JSON)")
    p.add_argument("--work-dir", default=DEFAULT_WORK, help="run folders (checkpoints, logs)")
    p.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel/random-init probes")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="outer tqdm bar")
    a = p.parse_args(argv)
    methods = comma_list(p, "--methods", a.methods, METHODS)
    try:
        sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {a.batch_sizes!r}")
    if not sizes or min(sizes) < 2:
        p.error(f"--batch-sizes must be integers >= 2, got {a.batch_sizes!r}")
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    if a.threads < 0:
        p.error(f"--threads must be >= 0, got {a.threads}")
    for name in ("epochs", "epoch_size"):
        v = getattr(a, name)
        if v is not None and v < (1 if name == "epochs" else 0):
            p.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'epochs' else 0}, got {v}")
    if a.data_dir and not os.path.isdir(a.data_dir):
        p.error(f"--data-dir {a.data_dir!r} is not a directory")
    a.method_list, a.sizes = methods, sizes
    budget = dict(BUDGETS["quick" if a.quick else a.budget])
    if a.epochs is not None:
        budget["epochs"] = a.epochs
    if a.epoch_size is not None:
        budget["epoch_size"] = a.epoch_size
    a.budget_cfg = budget
    return a


def run_name(method: str, batch: int, seed: int) -> str:
    return f"{method}-b{batch}-s{seed}"


def train_argv(a, method: str, batch: int, seed: int, out_dir: str) -> list[str]:
    b = a.budget_cfg
    argv = [*METHODS[method], "--preset", b["preset"], *b["args"], "--batch-size", str(batch),
            "--seed", str(seed), "--epochs", str(b["epochs"]), "--epoch-size", str(b["epoch_size"]),
            "--eval-every", str(b["epochs"]), "--probe-train-limit", str(b["probe_train"]),
            "--probe-eval-limit", str(b["probe_eval"]), "--probe-iters", str(b["probe_iters"]),
            "--threads", str(a.threads), "--device", a.device, "--no-progress", "--out-dir", out_dir]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir, "--no-download"]
    return argv


def _probe(trainer, net, raw=False) -> dict:
    from minc_train.metrics import effective_rank, linear_probe
    cfg = trainer.cfg
    ftr, ytr = trainer.features(net, "train", cfg.probe_train_limit, raw=raw)
    fte, yte = trainer.features(net, "eval", cfg.probe_eval_limit, raw=raw)
    r = linear_probe(ftr, ytr, fte, yte, max_iter=cfg.probe_iters, num_classes=trainer.num_classes)
    r["dim"] = int(ftr.shape[1])
    r["eff_rank"] = effective_rank(fte)
    return r


def one_run(a, method: str, batch: int, seed: int, need_baseline: bool) -> tuple[dict, dict | None]:
    """Train (or resume) one run, probe it; returns (run record, baselines or None)."""
    import copy

    import torch
    from minc_train import cli
    from minc_train.engine import Trainer
    name = run_name(method, batch, seed)
    out_dir = os.path.join(a.work_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    argv = train_argv(a, method, batch, seed, out_dir)
    ck = os.path.join(out_dir, "checkpoint.pt")
    if os.path.isfile(ck):  # an interrupted run: continue from its last finished epoch
        cfg = cli.resolve_config(["--resume", out_dir, "--no-progress", "--threads", str(a.threads)])
    else:
        cfg = cli.resolve_config(argv)
    t0, c0 = time.time(), time.process_time()
    rec = {"run": name, "method": method, "batch_size": batch, "seed": seed, "argv": argv}
    trainer = Trainer(cfg)
    try:
        history = trainer.fit()
        rec["status"] = "ok"
    except FloatingPointError as exc:  # a diverged run is a result, not a crash of the study
        history, rec["status"], rec["error"] = trainer.history, "diverged", str(exc)
    rec.update(steps=trainer.total_steps, images_seen=trainer.total_steps * batch, lr=trainer.base_lr,
               final_loss=history[-1]["loss"] if history else None,
               knn_acc=history[-1].get("knn_acc") if history else None)
    rec["train_wall_s"] = time.time() - t0
    if rec["status"] == "ok":
        t1 = time.time()
        rec["probe"] = _probe(trainer, trainer.model.backbone)
        rec["test_acc"] = rec["probe"]["test_acc"]
        rec["probe_wall_s"] = time.time() - t1
    else:
        rec["test_acc"] = None
    rec["wall_s"] = time.time() - t0
    rec["cpu_s"] = time.process_time() - c0
    base = None
    if need_baseline:
        rand = copy.deepcopy(trainer.model.backbone)
        rand.load_state_dict(trainer.init_backbone_state)
        base = {"seed": seed, "random_init": _probe(trainer, rand),
                "raw_pixels": _probe(trainer, None, raw=True)}
        del rand
    del trainer
    torch.set_num_threads(max(a.threads, 1))
    return rec, base


def summarize(runs: list[dict], baselines: list[dict], methods, sizes) -> dict:
    out = {"methods": {}, "baselines": {}}
    for m in methods:
        out["methods"][m] = {}
        for b in sizes:
            rs = [r for r in runs if r["method"] == m and r["batch_size"] == b]
            s = mean_std([r.get("test_acc") for r in rs])
            s["diverged"] = sum(r.get("status") == "diverged" for r in rs)
            out["methods"][m][str(b)] = s
    for key in ("raw_pixels", "random_init"):
        out["baselines"][key] = mean_std([bl[key]["test_acc"] for bl in baselines])
    return out


def write_table(summary: dict, meta: dict, methods, sizes, path: str) -> None:
    fmt = lambda s: ("—" if s["mean"] is None else f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})"
                     + (f", {s['diverged']} diverged" if s.get("diverged") else ""))
    lines = [f"Linear-probe test accuracy (%) on Fashion-MNIST, mean ± std over seeds; "
             f"{meta['images_per_run']} images seen per run ({meta['budget']} budget).", "",
             "| method | " + " | ".join(f"batch {b}" for b in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for m in methods:
        cells = [fmt(summary["methods"][m][str(b)]) for b in sizes]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    for key, label in (("random_init", "same net, random init"), ("raw_pixels", "raw pixels")):
        s = summary["baselines"][key]
        if s["n"]:
            lines.append(f"| {label} | " + " | ".join([fmt(s)] * len(sizes)) + " |")
    best = []
    for b in sizes:
        cands = [(summary["methods"][m][str(b)]["mean"], m) for m in methods
                 if summary["methods"][m][str(b)]["mean"] is not None]
        if cands:
            best.append(f"batch {b}: {LABELS[max(cands)[1]]}")
    lines += ["", "Best mean per batch size: " + "; ".join(best) + "."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(summary: dict, runs: list[dict], methods, sizes, path: str, title: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    markers = {"spectral": "o", "minc": "s", "minc-gha": "^", "mio": "D"}
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for b in sizes:
            s = summary["methods"][m][str(b)]
            if s["mean"] is not None:
                xs.append(b * (1 + 0.03 * (i - 1.5)))  # small offsets so error bars do not overlap
                ys.append(s["mean"])
                es.append(s["std"])
        if not xs:
            continue
        line = ax.errorbar(xs, ys, yerr=es, marker=markers.get(m, "o"), capsize=3, label=LABELS[m])
        pts = [(r["batch_size"] * (1 + 0.03 * (i - 1.5)), r["test_acc"]) for r in runs
               if r["method"] == m and r.get("test_acc") is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, alpha=0.5,
                   color=line.lines[0].get_color())
    styles = {"random_init": ("same net, random init", ":"), "raw_pixels": ("raw pixels", "--")}
    for key, (label, ls) in styles.items():
        s = summary["baselines"][key]
        if s["n"]:
            ax.axhline(s["mean"], ls=ls, color="grey", lw=1, label=f"{label} ({s['mean']:.1f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_xlabel("batch size (same images seen per run)")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    from tqdm import tqdm
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    runs_dir = os.path.join(a.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    os.makedirs(a.work_dir, exist_ok=True)
    t0 = time.time()
    plan = [(m, b, s) for s in range(a.seeds) for b in a.sizes for m in a.method_list]
    bar = tqdm(plan, desc="batch-size study", disable=not a.progress, dynamic_ncols=True)
    for m, b, s in bar:
        bar.set_postfix(run=run_name(m, b, s))
        path = os.path.join(runs_dir, run_name(m, b, s) + ".json")
        bpath = os.path.join(runs_dir, f"baselines-s{s}.json")
        need_base = not a.no_baselines and not os.path.isfile(bpath)
        done = os.path.isfile(path)
        if done and not need_base:
            continue  # finished in an earlier invocation
        if done:  # only the seed's baselines are missing: no training needed
            with open(path) as f:
                rec = json.load(f)
            base = baseline_only(a, m, b, s)
        else:
            rec, base = one_run(a, m, b, s, need_base)
        write_json(rec, path)
        if base is not None:
            write_json(base, bpath)
        acc = rec.get("test_acc")
        tqdm.write(f"{rec['run']}: {rec['status']}, probe {acc if acc is None else round(acc, 2)} %, "
                   f"{rec['wall_s']:.0f} s")
    runs = []
    for m, b, s in plan:
        path = os.path.join(runs_dir, run_name(m, b, s) + ".json")
        if os.path.isfile(path):
            runs.append(json.load(open(path)))
    baselines = [json.load(open(os.path.join(runs_dir, f))) for f in sorted(os.listdir(runs_dir))
                 if f.startswith("baselines-s") and f.endswith(".json")
                 and int(f[len("baselines-s"):-5]) < a.seeds]
    summary = summarize(runs, baselines, a.method_list, a.sizes)
    bcfg = a.budget_cfg
    from minc_train.data import find_fashion_mnist
    meta = {"budget": "quick" if a.quick else a.budget, "budget_config": bcfg,
            "images_per_run": bcfg["epochs"] * bcfg["epoch_size"] if bcfg["epoch_size"] else
            f"{bcfg['epochs']} epochs of the training set",
            "lr_rule": ("AdamW, lr 1e-3 x sqrt(batch/256)" if bcfg["preset"] == "cpu"
                        else "each method's GPU recipe (LARS/SGD lr x batch/256; MIO unscaled)"),
            "probe": f"L-BFGS logistic regression, {bcfg['probe_iters']} it., standardised backbone "
                     f"features; train limit {bcfg['probe_train'] or 'all'}, test limit "
                     f"{bcfg['probe_eval'] or 'all'} of the 10k test split",
            "methods": a.method_list, "batch_sizes": a.sizes, "seeds": a.seeds,
            "runs_done": len(runs), "runs_planned": len(plan),
            "dataset": find_fashion_mnist(a.data_dir), "threads": a.threads,
            "command": "python -m minc_train.studies.batch_size " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:]),
            "this_invocation_wall_s": time.time() - t0,
            "sum_run_wall_s": sum(r.get("wall_s", 0) for r in runs),
            "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count()}
    write_json({"meta": meta, "summary": summary, "runs": runs, "baselines": baselines},
                os.path.join(a.out, "results.json"))
    write_table(summary, meta, a.method_list, a.sizes, os.path.join(a.out, "table.md"))
    title = (f"Fashion-MNIST linear probe vs batch size, {meta['images_per_run']} images per run, "
             f"{a.seeds} seed(s), {len(runs)}/{len(plan)} runs")
    plot(summary, runs, a.method_list, a.sizes, os.path.join(a.out, "accuracy_vs_batch.png"), title)
    print(open(os.path.join(a.out, "table.md")).read())
    return 0


def baseline_only(a, method, batch, seed):
    """Baselines for a seed whose runs were all saved already: build a Trainer, no training."""
    import copy
    from minc_train import cli
    from minc_train.engine import Trainer
    out_dir = os.path.join(a.work_dir, "baselines-s" + str(seed))
    os.makedirs(out_dir, exist_ok=True)
    trainer = Trainer(cli.resolve_config(train_argv(a, method, batch, seed, out_dir)))
    rand = copy.deepcopy(trainer.model.backbone)
    rand.load_state_dict(trainer.init_backbone_state)
    return {"seed": seed, "random_init": _probe(trainer, rand),
                  "raw_pixels": _probe(trainer, None, raw=True)}


if __name__ == "__main__":
    sys.exit(main())
