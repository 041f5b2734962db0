"""Study 2 (issue 8): does keeping the MI formulation prevent collapse?

``python -m minc_train.studies.collapse [--budget cpu|gpu] [--threads 1] [--seed 0]``

Trains MINC, the spectral contrastive loss, and the MINC ablation without the moment
(covariance) term, ``L = -(2/B) Σ_i (p1_i·t2_i + p2_i·t1_i)`` (``--minc-ablation
no-moment`` of the training program), on Fashion-MNIST with the CPU preset's conv net.
Every ``--eval-every`` steps, on one fixed held-out batch (no augmentation, eval mode), it
records for the projector outputs ``z`` (the embeddings the losses see) and the backbone
features ``h``:

* the effective rank ``exp(H(σ/Σσ))`` (:func:`minc_train.metrics.effective_rank`);
* the per-dimension std of the L2-normalised embeddings, averaged over dimensions
  (SimSiam's collapse signal: about ``1/sqrt(d)`` for spread-out embeddings, -> 0 when all
  embeddings point the same way), reported also times ``sqrt(d)`` (1 = isotropic);
* the mean embedding norm, and the training loss (mean over the steps since the last record).

Writes ``results.json``, ``table.md`` and ``collapse.png`` under
``examples/results/studies/collapse/``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from minc_train.plots import pyplot, save_figure
from minc_train.studies._common import RESULTS, ROOT, comma_list, write_json

DEFAULT_OUT = os.path.join(RESULTS, "collapse")
DEFAULT_WORK = os.path.join(ROOT, "runs", "studies", "collapse")

METHODS = {"minc": ["--method", "minc"],
           "spectral": ["--method", "spectral"],
           # --no-normalize: the GPU preset turns normalisation on; the control stays raw
           "minc-no-moment": ["--method", "minc", "--minc-ablation", "no-moment", "--no-normalize"],
           # not in the default set: the ablation with L2-normalised p and t is BYOL's loss
           # (2 - 2cos up to constants), which is known not to collapse thanks to the predictor+EMA
           "minc-no-moment-normalized": ["--method", "minc", "--minc-ablation", "no-moment", "--normalize"]}
LABELS = {"minc": "MINC", "spectral": "spectral contrastive", "minc-no-moment": "MINC without M (ablation)",
          "minc-no-moment-normalized": "MINC without M, normalised p,t (= BYOL)"}
DEFAULT_METHODS = ("minc", "spectral", "minc-no-moment")

# steps = epochs x epoch_size / batch; the lr schedule (warm-up + cosine) spans exactly them.
BUDGETS = {
    "cpu": dict(preset="cpu", batch=256, epochs=2, steps_per_epoch=100, eval_every=10, probe_batch=1024,
                warmup_epochs=0.2, args=[]),
    "gpu": dict(preset="gpu", batch=512, epochs=20, steps_per_epoch=117, eval_every=50, probe_batch=2048,
                warmup_epochs=2.0, args=["--arch", "resnet18"]),
    "quick": dict(preset="cpu", batch=16, epochs=1, steps_per_epoch=4, eval_every=2, probe_batch=32,
                  warmup_epochs=0.25,
                  args=["--width", "4", "--pool", "1", "--proj-hidden", "16", "--proj-dim", "8",
                        "--pred-hidden", "16"]),
}


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the std over samples of ``z / ||z||`` (SimSiam, Chen & He 2021):
    ``≈ 1/sqrt(d)`` for isotropic embeddings, 0 when every embedding has the same direction."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be a (N >= 2, d) tensor, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    zn = F.normalize(z.detach().double(), dim=1)
    return float(zn.std(dim=0).mean())


def embedding_stats(z: torch.Tensor) -> dict:
    """Effective rank, normalised per-dimension std (raw and x sqrt(d)) and mean norm of (N, d) z."""
    from minc_train.metrics import effective_rank
    z = z.detach().double()
    finite = bool(torch.isfinite(z).all())
    if not finite:
        return {"finite": False, "eff_rank": None, "norm_std": None, "norm_std_x_sqrt_d": None,
                "mean_norm": None, "dim": int(z.shape[1])}
    s = normalized_std(z)
    return {"finite": True, "eff_rank": effective_rank(z), "norm_std": s,
            "norm_std_x_sqrt_d": s * math.sqrt(z.shape[1]), "mean_norm": float(z.norm(dim=1).mean()),
            "dim": int(z.shape[1])}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minc_train.studies.collapse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: the CPU preset's conv net, 200 steps of batch 256 per method; "
                   "gpu: ResNet-18, 2340 steps of batch 512 (untested here)")
    p.add_argument("--quick", action="store_true", help="a few steps of a tiny net (for tests)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, help="override the budget's training steps per method")
    p.add_argument("--eval-every", type=int, help="record the metrics every N steps")
    p.add_argument("--batch-size", type=int, help="override the budget's batch size")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json, table.md, collapse.png")
    p.add_argument("--work-dir", default=DEFAULT_WORK, help="scratch run folders")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    p.add_argument("--replot", action="store_true",
                   help="only redraw table.md and collapse.png from the results.json in --out")
    a = p.parse_args(argv)
    a.method_list = comma_list(p, "--methods", a.methods, METHODS)
    b = dict(BUDGETS["quick" if a.quick else a.budget])
    if a.batch_size is not None:
        if a.batch_size < 2:
            p.error(f"--batch-size must be >= 2, got {a.batch_size}")
        b["batch"] = a.batch_size
    if a.steps is not None:
        if a.steps < 1:
            p.error(f"--steps must be >= 1, got {a.steps}")
        b["epochs"], b["steps_per_epoch"] = 1, a.steps
        b["warmup_epochs"] = 0.1
    if a.eval_every is not None:
        if a.eval_every < 1:
            p.error(f"--eval-every must be >= 1, got {a.eval_every}")
        b["eval_every"] = a.eval_every
    if a.threads < 0:
        p.error(f"--threads must be >= 0, got {a.threads}")
    if a.data_dir and not os.path.isdir(a.data_dir):
        p.error(f"--data-dir {a.data_dir!r} is not a directory")
    a.budget_cfg = b
    return a


def train_argv(a, method: str, out_dir: str) -> list[str]:
    b = a.budget_cfg
    argv = [*METHODS[method], "--preset", b["preset"], *b["args"], "--batch-size", str(b["batch"]),
            "--epochs", str(b["epochs"]), "--epoch-size", str(b["batch"] * b["steps_per_epoch"]),
            "--warmup-epochs", str(b["warmup_epochs"]), "--seed", str(a.seed), "--threads", str(a.threads),
            "--device", a.device, "--eval-every", "0", "--no-probe", "--no-progress", "--out-dir", out_dir]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir, "--no-download"]
    return argv


@torch.no_grad()
def measure(trainer, x: torch.Tensor) -> dict:
    """Embedding statistics of the fixed batch ``x`` (eval mode), restoring train mode."""
    model = trainer.model
    was = model.training
    model.eval()
    with trainer.autocast():
        h = model.encoder.backbone(x).float().flatten(1)
        z = model.encoder.projector(h).float()
    model.train(was)
    return {"proj": embedding_stats(z), "backbone": embedding_stats(h)}


def run_method(a, method: str, bar=None) -> dict:
    from minc_train import cli
    from minc_train.engine import Trainer
    out_dir = os.path.join(a.work_dir, method)
    os.makedirs(out_dir, exist_ok=True)
    argv = train_argv(a, method, out_dir)
    cfg = cli.resolve_config(argv)
    trainer = Trainer(cfg)
    b = a.budget_cfg
    held = trainer.eval_ds.subset(b["probe_batch"], seed=12345)
    x = held.normalize(held.images, trainer.device)
    t0 = time.time()
    records = [{"step": 0, "loss": None, **measure(trainer, x)}]
    status, losses = "ok", []
    trainer.train_mode()
    for epoch in range(cfg.epochs):
        for x1, x2 in trainer.batches(epoch):
            losses.append(float(trainer.train_step(x1, x2)))
            if bar is not None:
                bar.update(1)
            if trainer.step % b["eval_every"] == 0 or trainer.step == trainer.total_steps:
                rec = {"step": trainer.step, "loss": sum(losses) / len(losses), "lr": trainer.last_lr,
                       "elapsed_s": time.time() - t0, **measure(trainer, x)}
                losses = []
                records.append(rec)
                if not math.isfinite(rec["loss"]) or not rec["proj"]["finite"]:
                    status = f"diverged at step {trainer.step} (loss {rec['loss']})"
                    break
        if status != "ok":
            break
    if bar is not None and status != "ok":
        bar.update(trainer.total_steps - trainer.step)
    final = {"status": status, "steps": trainer.step, "train_wall_s": time.time() - t0}
    if status == "ok":  # a kNN check of what the backbone learned (context for the ranks)
        ev = trainer.evaluate()
        final.update(knn_acc=ev["knn_acc"], knn_backbone_eff_rank=ev["eff_rank"])
    return {"method": method, "label": LABELS[method], "argv": argv, "lr": trainer.base_lr,
            "proj_dim": cfg.proj_dim, "feat_dim": trainer.feat_dim, "records": records, "final": final}


def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def write_table(results: dict, path: str) -> None:
    meta = results["meta"]
    lines = [f"Collapse study on Fashion-MNIST: {meta['steps']} steps of batch {meta['batch_size']}, "
             f"metrics on {meta['probe_batch']} fixed held-out images at the last step.", "",
             "| method | status | eff. rank z (of d) | std(z/‖z‖)·√d | mean ‖z‖ "
             "| eff. rank h (of d) "
             "| std(h/‖h‖)·√d | final loss | kNN acc (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        last = r["records"][-1]
        pz, ph = last["proj"], last["backbone"]
        lines.append(f"| {r['label']} | {r['final']['status']} | {_fmt(pz['eff_rank'], '.1f')} ({pz['dim']}) "
                     f"| {_fmt(pz['norm_std_x_sqrt_d'])} | {_fmt(pz['mean_norm'])} "
                     f"| {_fmt(ph['eff_rank'], '.1f')} ({ph['dim']}) | {_fmt(ph['norm_std_x_sqrt_d'])} "
                     f"| {_fmt(last['loss'], '.4g')} | {_fmt(r['final'].get('knn_acc'), '.2f')} |")
    first = {m: r["records"][0]["proj"] for m, r in results["methods"].items()}
    lines += ["", "At step 0 (random init): " + "; ".join(
        f"{results['methods'][m]['label']}: eff. rank z {_fmt(v['eff_rank'], '.1f')}, "
        f"std·√d {_fmt(v['norm_std_x_sqrt_d'])}, ‖z‖ {_fmt(v['mean_norm'])}"
        for m, v in first.items()) + ".",
              "", "std(z/‖z‖)·√d is 1 for isotropic embeddings and 0 for fully collapsed ones "
              "(SimSiam's per-dimension std of the L2-normalised output, times √d)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: dict, path: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=110)
    panels = [("eff_rank", "effective rank of embeddings (log scale)", True),
              ("norm_std_x_sqrt_d", "std of L2-normalised embeddings × √d", False),
              ("mean_norm", "mean embedding norm ‖z‖", True),
              ("loss", "training loss (mean since last point)", False)]
    colors = {}
    for ax, (key, title, logy) in zip(axes.flat, panels):
        for m, r in results["methods"].items():
            recs = r["records"]
            if key == "loss":
                pts = [(q["step"], q["loss"]) for q in recs
                       if q["loss"] is not None and math.isfinite(q["loss"])]
            else:
                pts = [(q["step"], q["proj"][key]) for q in recs if q["proj"][key] is not None]
            if not pts:
                continue
            ln, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{r['label']}: z")
            colors[m] = ln.get_color()
            if key in ("eff_rank", "norm_std_x_sqrt_d"):
                q = [(q["step"], q["backbone"][key]) for q in recs if q["backbone"][key] is not None]
                ax.plot([p[0] for p in q], [p[1] for p in q], ls="--", color=colors[m], alpha=0.7,
                        label=f"{r['label']}: backbone h")
        if key == "norm_std_x_sqrt_d":
            ax.axhline(1.0, ls=":", color="grey", lw=1)
            ax.text(0, 1.0, "isotropic", fontsize=7, color="grey", va="bottom")
        if key == "loss":
            ax.set_yscale("symlog", linthresh=1.0)
        elif logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[2].legend(handles, labels, fontsize=7, loc="lower right")  # the emptiest corner
    meta = results["meta"]
    fig.suptitle(f"Collapse study, Fashion-MNIST, {meta['arch']}, batch {meta['batch_size']}, "
                 f"metrics on {meta['probe_batch']} held-out images (solid: projector z, dashed: backbone h)",
                 fontsize=9)
    return save_figure(fig, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    from tqdm import tqdm
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    if a.replot:
        path = os.path.join(a.out, "results.json")
        if not os.path.isfile(path):
            raise SystemExit(f"--replot: no results.json in --out {a.out!r}")
        with open(path) as f:
            results = json.load(f)
        write_table(results, os.path.join(a.out, "table.md"))
        plot(results, os.path.join(a.out, "collapse.png"))
        print(open(os.path.join(a.out, "table.md")).read())
        return 0
    b = a.budget_cfg
    steps = b["epochs"] * b["steps_per_epoch"]
    t0 = time.time()
    results = {"methods": {}}
    bar = tqdm(total=steps * len(a.method_list), desc="collapse study", disable=not a.progress,
               dynamic_ncols=True)
    for m in a.method_list:
        bar.set_postfix(method=m)
        results["methods"][m] = run_method(a, m, bar)
        f = results["methods"][m]["final"]
        tqdm.write(f"{m}: {f['status']}, {f['train_wall_s']:.0f} s")
    bar.close()
    any_run = next(iter(results["methods"].values()))
    results["meta"] = {
        "budget": "quick" if a.quick else a.budget, "budget_config": b, "steps": steps,
        "batch_size": b["batch"], "probe_batch": b["probe_batch"], "seed": a.seed, "threads": a.threads,
        "arch": "ResNet-18" if a.budget == "gpu" and not a.quick else "conv net (CPU preset)",
        "proj_dim": any_run["proj_dim"], "feat_dim": any_run["feat_dim"],
        "command": "python -m minc_train.studies.collapse "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": time.time() - t0, "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count()}
    write_json(results, os.path.join(a.out, "results.json"))
    write_table(results, os.path.join(a.out, "table.md"))
    plot(results, os.path.join(a.out, "collapse.png"))
    print(open(os.path.join(a.out, "table.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
