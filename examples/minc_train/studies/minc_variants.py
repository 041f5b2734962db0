"""Study (issue 12): which MINC feature normalisation trains under other people's recipes.

``python -m minc_train.studies.minc_variants [--recipes lightly,project] [--seeds 2] [--threads 1]``

Compares MINC's variants (``l2``: unit-norm p and t, M the moment of the unit targets;
``clip``: rows clipped to norm sqrt(mu), loss / mu; ``none``: the raw form; ``l2-s10``: unit rows
times 10, the scale one re-implementation uses) with the spectral
contrastive loss and BYOL's negative cosine on Fashion-MNIST, under two recipes:

* ``lightly``: lightly's BYOL example loop with lightly's own pieces (``BYOLProjectionHead``,
  ``BYOLPredictionHead``, ``update_momentum`` on backbone and projector with
  ``cosine_schedule(step, steps, 0.996, 1)``, the symmetric call
  ``0.5 * (criterion(p0, z1) + criterion(p1, z0))``, plain ``torch.optim.SGD(lr=0.06)`` as
  in lightly's example (``--lightly-sgd-momentum`` to change), no weight decay, constant lr);
  only the criterion changes between methods.  Heads at reduced width (512 -> 512 -> 128,
  128 -> 512 -> 128) on the width-16 conv backbone (512 features).
* ``project``: the training program's CPU recipe (``--preset cpu``: AdamW at each method's
  preset lr, wd 1e-4, warm-up + cosine, EMA 0.99 -> 1, heads 1024/128/1024, mild 28-px views,
  the preset's autocast; each run's JSON records its optimizer and amp) on the same
  width-16 backbone; MINC variants and BYOL swap the loss module of the ``minc`` method
  (predictor + EMA target, symmetric call); spectral is the program's own ``spectral``.

Every run sees ``epochs x epoch_size`` images (default 6 x 20480 = 122,880, 3x the 40,960 of
the batch-size study) at batch 256, with the same mild views.  Evaluation on the backbone
features (eval mode): a linear probe (L-BFGS logistic regression on standardised features,
10,000 training images -> the full 10k test split) and a weighted kNN (k=20, cosine) with
the same split; baselines: raw pixels and the same backbone at its random initialisation.

Resumable: one JSON per finished run under ``<out>/runs/`` (skipped on restart).  Writes
``results.json``, ``table.md`` and ``minc_variants.png``.  A diverged run (non-finite loss or
a refused non-finite target) is recorded with the step it diverged at.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

from minc_train.plots import pyplot, save_figure
from minc_train.studies._common import RESULTS, ROOT, comma_list, mean_std, write_json

DEFAULT_OUT = os.path.join(RESULTS, "minc-variants-cpu")
DEFAULT_WORK = os.path.join(ROOT, "runs", "studies", "minc_variants")

RECIPES = ("lightly", "project")
METHODS = ("minc-l2", "minc-clip", "minc-none", "byol", "spectral", "minc-l2-s10")
DEFAULT_METHODS = ("minc-l2", "minc-clip", "minc-none", "minc-l2-s10", "byol", "spectral")
LABELS = {"minc-l2": "MINC l2", "minc-clip": "MINC clip (mu=1)", "minc-none": "MINC raw (none)",
          "minc-l2-s10": "MINC l2, scale 10", "byol": "BYOL (neg. cosine)",
          "spectral": "spectral contrastive"}
RECIPE_LABELS = {"lightly": "lightly BYOL recipe (SGD 0.06)",
                 "project": "project CPU recipe (AdamW)"}

BUDGETS = {
    "cpu": dict(epochs=6, epoch_size=20480, batch_size=256, width=16, pool=2, probe_train=10000,
                probe_eval=0, probe_iters=100, knn_k=20),
    # for tests: a few steps on whatever --data-dir holds
    "quick": dict(epochs=1, epoch_size=64, batch_size=32, width=4, pool=1, probe_train=48,
                  probe_eval=24, probe_iters=5, knn_k=3),
}
# lightly's heads at reduced width: (hidden, out) of the projector; the predictor is out -> hidden -> out
LIGHTLY_HEADS = {"cpu": (512, 128), "quick": (16, 8)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minc_train.studies.minc_variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of lightly,project")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (>= 1)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a few steps per run (for tests)")
    p.add_argument("--epochs", type=int, help="override the budget's epochs")
    p.add_argument("--epoch-size", type=int, help="override the budget's images per epoch")
    p.add_argument("--lightly-lr", type=float, default=0.06, help="lightly recipe: SGD lr (0.06)")
    p.add_argument("--lightly-sgd-momentum", type=float, default=0.0,
                   help="lightly recipe: SGD momentum (lightly's BYOL example uses none: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--data-dir", help="Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (JSON, table, PNG, per-run JSON)")
    p.add_argument("--work-dir", default=DEFAULT_WORK, help="run folders (training-program logs)")
    p.add_argument("--replot", action="store_true", help="only rebuild results/table/plot from runs/")
    a = p.parse_args(argv)
    a.recipe_list = comma_list(p, "--recipes", a.recipes, RECIPES)
    a.method_list = comma_list(p, "--methods", a.methods, METHODS)
    if a.seeds < 1 or a.seed_start < 0:
        p.error(f"--seeds must be >= 1 and --seed-start >= 0, got {a.seeds} and {a.seed_start}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.data_dir and not os.path.isdir(a.data_dir):
        p.error(f"--data-dir {a.data_dir!r} is not a directory")
    budget = dict(BUDGETS["quick" if a.quick else "cpu"])
    for name in ("epochs", "epoch_size"):
        v = getattr(a, name)
        if v is not None:
            if v < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
            budget[name] = v
    if budget["epoch_size"] < budget["batch_size"]:
        p.error(f"--epoch-size must be >= the batch size {budget['batch_size']}")
    a.budget = budget
    a.heads = LIGHTLY_HEADS["quick" if a.quick else "cpu"]
    a.seed_list = list(range(a.seed_start, a.seed_start + a.seeds))
    return a


# ---------------------------------------------------------------------- losses
def minc_variant(method: str, dim: int):
    """``(loss module, implementation)`` for a MINC variant: the library's
    ``MINCLoss(feature_norm=...)`` when it has one, else the same maps applied here (SPEC §2,
    "Scale"): the gradient flows through p's map, t is stop-gradient, M is the moment of the
    mapped targets."""
    from minc_kernels import MINCLoss
    norm = {"minc-l2": "l2", "minc-clip": "clip", "minc-none": "none", "minc-l2-s10": "l2"}[method]
    scale = 10.0 if method.endswith("-s10") else None
    try:
        kw = {"feature_norm": norm, "mu": 1.0}
        if scale is not None:
            kw["scale"] = scale
        return MINCLoss(dim, **kw), "minc_kernels.MINCLoss(feature_norm=...)"
    except TypeError:
        return _MappedMINC(MINCLoss(dim), norm, scale or 1.0, mu=1.0), "study prototype (pre-map + raw MINCLoss)"


def _map_rows(x, norm: str, scale: float, mu: float):
    import torch
    if norm == "l2":
        return scale * torch.nn.functional.normalize(x, dim=1)
    if norm == "clip":
        n = x.norm(dim=1, keepdim=True)
        return x * torch.clamp(math.sqrt(mu) / n.clamp_min(1e-12), max=1.0)
    return x


class _MappedMINC:
    """Prototype of the variants on the raw ``MINCLoss`` (used only if the library has none)."""

    def __new__(cls, inner, norm, scale, mu):
        import torch

        class Mapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner, self.norm, self.scale, self.mu = inner, norm, scale, mu

            def forward(self, p, t):
                def m(v):
                    if isinstance(v, (tuple, list)):
                        return type(v)(_map_rows(x, self.norm, self.scale, self.mu) for x in v)
                    return _map_rows(v, self.norm, self.scale, self.mu)
                out = self.inner(m(p), m(t))
                return out / self.mu if self.norm == "clip" else out
        return Mapped()


def neg_cosine_pairs():
    """lightly's ``NegativeCosineSimilarity`` summed over the symmetric pairs ``((p1, p2), (t2, t1))``
    (the training program's call) or on one pair (lightly's loop)."""
    import torch
    from lightly.loss import NegativeCosineSimilarity

    class PairsNegCos(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.crit = NegativeCosineSimilarity()

        def forward(self, p, t):
            if isinstance(p, (tuple, list)):
                return sum(self.crit(pi, ti.detach()) for pi, ti in zip(p, t))
            return self.crit(p, t.detach())
    return PairsNegCos()


def make_criterion(method: str, dim: int):
    if method == "byol":
        return neg_cosine_pairs(), "lightly.loss.NegativeCosineSimilarity"
    if method == "spectral":
        from minc_kernels import SpectralContrastiveLoss
        return SpectralContrastiveLoss(mu=1.0), "minc_kernels.SpectralContrastiveLoss(mu=1)"
    return minc_variant(method, dim)


# ---------------------------------------------------------------------- evaluation
def load_data(a):
    from minc_train import data as D
    train, test = D.load_fashion_mnist(a.data_dir, download=False)
    return train, test


def evaluate(backbone, train, test, a, seed: int, raw: bool = False) -> dict:
    """Linear probe and kNN (%) on backbone features (eval mode) or raw pixels."""
    import torch
    from minc_train.metrics import effective_rank, knn_accuracy, linear_probe
    b = a.budget
    tr = train.subset(b["probe_train"], seed=seed)
    te = test.subset(b["probe_eval"], seed=seed + 1)

    @torch.no_grad()
    def feats(ds):
        out = []
        was = backbone.training if backbone is not None else False
        if backbone is not None:
            backbone.eval()
        for s in range(0, len(ds), 512):
            x = ds.normalize(ds.images[s:s + 512])
            out.append(x.flatten(1) if raw else backbone(x).float().flatten(1))
        if backbone is not None:
            backbone.train(was)
        return torch.cat(out)
    ftr, fte = feats(tr), feats(te)
    probe = linear_probe(ftr, tr.labels, fte, te.labels, max_iter=b["probe_iters"], num_classes=10)
    return {"probe_acc": probe["test_acc"], "probe_train_acc": probe["train_acc"],
            "knn_acc": knn_accuracy(ftr, tr.labels, fte, te.labels, k=b["knn_k"], num_classes=10),
            "eff_rank": effective_rank(fte), "dim": int(ftr.shape[1]),
            "n_train": int(ftr.shape[0]), "n_test": int(fte.shape[0])}


def build_backbone(a, seed: int):
    import torch
    from minc_train.models import build_backbone as bb
    torch.manual_seed(seed)  # as the training program does before building its backbone
    return bb("convnet", 1, "auto", 28, a.budget["width"], a.budget["pool"])


# ---------------------------------------------------------------------- recipe: lightly's loop
def run_lightly(a, method: str, seed: int, train) -> dict:
    """lightly's BYOL example loop, only the criterion swapped."""
    import torch
    from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from minc_train import data as D
    b = a.budget
    backbone, feat_dim = build_backbone(a, seed)
    hidden, out = a.heads
    projection_head = BYOLProjectionHead(feat_dim, hidden, out)
    prediction_head = BYOLPredictionHead(out, hidden, out)
    backbone_momentum = copy.deepcopy(backbone)
    projection_head_momentum = copy.deepcopy(projection_head)
    deactivate_requires_grad(backbone_momentum)
    deactivate_requires_grad(projection_head_momentum)
    criterion, impl = make_criterion(method, out)
    params = [*backbone.parameters(), *projection_head.parameters(), *prediction_head.parameters()]
    optimizer = torch.optim.SGD(params, lr=a.lightly_lr, momentum=a.lightly_sgd_momentum)
    v1, v2 = D.view_configs("mild", 28, 1)
    augs = (D.BatchAugment(v1, 28, train.mean, train.std), D.BatchAugment(v2, 28, train.mean, train.std))
    steps_per_epoch = min(b["epoch_size"], len(train)) // b["batch_size"]
    steps = steps_per_epoch * b["epochs"]
    mods = (backbone, projection_head, prediction_head, backbone_momentum, projection_head_momentum)
    for m in mods:
        m.train()
    criterion.train()

    def online(x):
        return prediction_head(projection_head(backbone(x).flatten(start_dim=1)))

    def momentum_branch(x):
        with torch.no_grad():
            return projection_head_momentum(backbone_momentum(x).flatten(start_dim=1)).detach()

    curve, status, error, step = [], "ok", None, 0
    window = torch.zeros(())
    for epoch in range(b["epochs"]):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + 12_345)
        perm = torch.randperm(len(train), generator=g)
        for s in range(steps_per_epoch):
            x = train.images[perm[s * b["batch_size"]:(s + 1) * b["batch_size"]]]
            x0, x1 = augs[0](x, g), augs[1](x, g)
            mom = cosine_schedule(step, steps, 0.996, 1)
            update_momentum(backbone, backbone_momentum, m=mom)
            update_momentum(projection_head, projection_head_momentum, m=mom)
            try:
                p0, p1 = online(x0), online(x1)
                z0, z1 = momentum_branch(x0), momentum_branch(x1)
                loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
                loss.backward()
            except (ValueError, FloatingPointError) as exc:  # e.g. MINCLoss refusing a NaN target
                status, error = "diverged", f"step {step}: {exc}"
                break
            optimizer.step()
            optimizer.zero_grad()
            window = window + loss.detach()
            step += 1
            if step % 10 == 0 or step == steps:
                val = float(window) / (10 if step % 10 == 0 else step % 10)
                window = torch.zeros(())
                curve.append([step, val])
                if not math.isfinite(val):
                    status, error = "diverged", f"step {step}: loss {val}"
                    break
        if status != "ok":
            break
    return {"status": status, "error": error, "steps": step, "steps_planned": steps,
            "images_seen": step * b["batch_size"], "loss_curve": curve, "criterion": impl,
            "optimizer": f"SGD(lr={a.lightly_lr}, momentum={a.lightly_sgd_momentum})",
            "heads": f"BYOLProjectionHead({feat_dim}, {hidden}, {out}), "
                     f"BYOLPredictionHead({out}, {hidden}, {out})",
            "_backbone": backbone}


# ---------------------------------------------------------------------- recipe: the training program
def train_argv(a, method: str, seed: int, out_dir: str) -> list[str]:
    b = a.budget
    argv = ["--method", "spectral" if method == "spectral" else "minc", "--preset", "cpu",
            "--arch", "convnet", "--width", str(b["width"]), "--pool", str(b["pool"]),
            "--batch-size", str(b["batch_size"]), "--epochs", str(b["epochs"]),
            "--epoch-size", str(b["epoch_size"]), "--warmup-epochs", str(b["epochs"] / 12),
            "--seed", str(seed), "--eval-every", "0", "--threads", str(a.threads), "--device", "cpu",
            "--no-progress", "--out-dir", out_dir, "--log-every", "10"]
    if a.quick:
        argv += ["--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "16"]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir, "--no-download"]
    return argv


def run_project(a, method: str, seed: int) -> dict:
    import csv
    from minc_train import cli
    from minc_train.engine import Trainer
    out_dir = os.path.join(a.work_dir, f"project-{method}-s{seed}")
    os.makedirs(out_dir, exist_ok=True)
    for f in ("checkpoint.pt", "log.csv"):  # a run interrupted mid-way starts again
        if os.path.exists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))
    argv = train_argv(a, method, seed, out_dir)
    trainer = Trainer(cli.resolve_config(argv))
    impl = "minc_train spectral method"
    if method != "spectral":
        # the minc method's wiring (predictor, EMA target, symmetric call); only the loss changes
        trainer.loss_fn, impl = make_criterion(method, trainer.cfg.proj_dim)
        trainer.loss_fn.to(trainer.device)
    status, error = "ok", None
    try:
        trainer.fit()
    except (ValueError, FloatingPointError) as exc:
        status, error = "diverged", f"step {trainer.step}: {exc}"
    curve = []
    log = os.path.join(out_dir, "log.csv")
    if os.path.exists(log):
        with open(log) as f:
            curve = [[int(r["step"]), float(r["loss"]) if r["loss"] else float("nan")]
                     for r in csv.DictReader(f)]
    cfg = trainer.cfg
    return {"status": status, "error": error, "steps": trainer.step, "steps_planned": trainer.total_steps,
            "images_seen": trainer.step * cfg.batch_size, "loss_curve": curve, "criterion": impl,
            "optimizer": f"{cfg.optimizer}(lr={trainer.base_lr}, wd={cfg.weight_decay}), warm-up "
                         f"{cfg.warmup_epochs} epochs + cosine", "amp": cfg.amp,
            "heads": f"projector {cfg.proj_hidden}/{cfg.proj_dim}, predictor {cfg.pred_hidden}",
            "argv": argv, "_backbone": trainer.model.backbone}


# ---------------------------------------------------------------------- driver
def run_name(recipe: str, method: str, seed: int) -> str:
    return f"{recipe}-{method}-s{seed}"


def code_state() -> dict:
    """The commit and any uncommitted change to the code a run imports (provenance: the
    working tree is shared, so a run may see edits that were committed later)."""
    import subprocess
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": git("status", "--porcelain", "--", "minc_kernels", "examples/minc_train")}


CODE_STATE = None  # taken once, when the study process starts (its imports are fixed then)


def one_run(a, recipe, method, seed, train, test) -> dict:
    import torch
    t0, c0 = time.time(), time.process_time()
    rec = run_lightly(a, method, seed, train) if recipe == "lightly" else run_project(a, method, seed)
    backbone = rec.pop("_backbone")
    rec.update(run=run_name(recipe, method, seed), recipe=recipe, method=method, seed=seed,
               code=CODE_STATE, train_wall_s=time.time() - t0, train_cpu_s=time.process_time() - c0)
    finite = all(torch.isfinite(p).all() for p in backbone.parameters())
    if rec["status"] == "ok" and finite:
        rec.update(evaluate(backbone, train, test, a, seed))
    else:
        rec.update(probe_acc=None, knn_acc=None)
    rec["wall_s"], rec["cpu_s"] = time.time() - t0, time.process_time() - c0
    torch.set_num_threads(a.threads)
    return rec


def summarize(runs, baselines, recipes, methods) -> dict:
    out = {"recipes": {}, "baselines": {}}
    for r in recipes:
        out["recipes"][r] = {}
        for m in methods:
            rs = [x for x in runs if x["recipe"] == r and x["method"] == m]
            out["recipes"][r][m] = {"probe": mean_std([x.get("probe_acc") for x in rs]),
                                    "knn": mean_std([x.get("knn_acc") for x in rs]),
                                    "diverged": sum(x["status"] != "ok" for x in rs),
                                    "diverged_at": [x.get("error") for x in rs if x["status"] != "ok"],
                                    "runs": len(rs)}
    for key in ("raw_pixels", "random_init"):
        out["baselines"][key] = {"probe": mean_std([b[key]["probe_acc"] for b in baselines]),
                                 "knn": mean_std([b[key]["knn_acc"] for b in baselines])}
    return out


def _fmt(s):
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.2f} ± {s['std']:.2f}" + ("" if s["n"] > 1 else " (n=1)")


def write_table(summary, meta, recipes, methods, path) -> None:
    lines = [f"Fashion-MNIST, width-16 conv backbone, {meta['images_per_run']:,} images per run "
             f"(batch {meta['budget']['batch_size']}), seeds {meta['seeds']}; test accuracy (%) "
             "of a linear probe / weighted kNN on backbone features, mean ± std over seeds.", ""]
    head = "| method | " + " | ".join(f"{RECIPE_LABELS[r]}: probe | kNN" for r in recipes) + " |"
    lines += [head, "|---|" + "---|---|" * len(recipes)]
    for m in methods:
        cells = []
        for r in recipes:
            s = summary["recipes"][r][m]
            if s["runs"] == 0:
                cells += ["not run", "not run"]
                continue
            div = f" ({s['diverged']}/{s['runs']} diverged)" if s["diverged"] else ""
            cells += [_fmt(s["probe"]) + div, _fmt(s["knn"])]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    for key, label in (("random_init", "same backbone, random init"), ("raw_pixels", "raw pixels")):
        s = summary["baselines"][key]
        if s["probe"]["n"]:
            lines.append(f"| {label} | " + " | ".join([_fmt(s["probe"]), _fmt(s["knn"])] * len(recipes)) + " |")
    divs = [f"{LABELS[m]} under {r}: {'; '.join(summary['recipes'][r][m]['diverged_at'])}"
            for r in recipes for m in methods if summary["recipes"][r][m]["diverged"]]
    if divs:
        lines += ["", "Diverged: " + " | ".join(divs)]
    lines += ["", f"Runs done: {meta['runs_done']}/{meta['runs_planned']}."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(summary, runs, recipes, methods, path, title) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 1 + len(recipes), figsize=(4.6 * (1 + len(recipes)), 4.2), dpi=110)
    ax = axes[0]
    width = 0.8 / max(len(recipes), 1)
    diverged = []  # bar positions of methods with no finished run (all diverged)
    colors = {"lightly": "tab:blue", "project": "tab:orange"}
    for j, r in enumerate(recipes):
        for i, m in enumerate(methods):
            s = summary["recipes"][r][m]
            x = i + (j - (len(recipes) - 1) / 2) * width
            if s["probe"]["mean"] is not None:
                ax.bar(x, s["probe"]["mean"], width * 0.9, yerr=s["probe"]["std"], capsize=2,
                       color=colors.get(r), label=RECIPE_LABELS[r] if i == 0 else None)
                for v in s["probe"]["values"]:
                    ax.plot(x, v, "k.", ms=3)
            elif s["runs"]:
                diverged.append(x)
    for key, ls in (("random_init", ":"), ("raw_pixels", "--")):
        s = summary["baselines"][key]["probe"]
        if s["n"]:
            ax.axhline(s["mean"], ls=ls, color="grey", lw=1,
                       label=f"{'random init' if key == 'random_init' else 'raw pixels'} ({s['mean']:.1f})")
    vals = [v for r in recipes for m in methods for v in summary["recipes"][r][m]["probe"]["values"]]
    vals += [summary["baselines"][k]["probe"]["mean"] for k in ("random_init", "raw_pixels")
             if summary["baselines"][k]["probe"]["n"]]
    if vals:
        ax.set_ylim(max(0, min(vals) - 4), min(100, max(vals) + 2))
    for x in diverged:
        ax.text(x, ax.get_ylim()[0] + 0.3, "diverged", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([LABELS[m] for m in methods], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.legend(fontsize=6, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    for ax, r in zip(axes[1:], recipes):
        for m in methods:
            rs = [x for x in runs if x["recipe"] == r and x["method"] == m and x.get("loss_curve")]
            for k, x in enumerate(rs):
                c = [(s, v) for s, v in x["loss_curve"] if math.isfinite(v)]
                if c:
                    ax.plot([s for s, _ in c], [v for _, v in c], lw=1,
                            color=f"C{METHODS.index(m)}", label=LABELS[m] if k == 0 else None)
        ax.set_title(RECIPE_LABELS[r], fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (each method's own scale)")
        big = [abs(v) for x in runs if x["recipe"] == r for _, v in x.get("loss_curve") or []
               if math.isfinite(v)]
        if big and max(big) > 10:  # a raw-form run blowing up: keep the others readable
            ax.set_yscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, bbox_inches="tight")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.lightly_lr != 0.06 or a.lightly_sgd_momentum:  # name the non-default SGD in table and plot
        RECIPE_LABELS["lightly"] = (f"lightly BYOL recipe (SGD {a.lightly_lr:g}, "
                                    f"momentum {a.lightly_sgd_momentum:g})")
    global CODE_STATE
    CODE_STATE = code_state()
    import torch
    import minc_kernels  # noqa: F401  (imported now, with the code state just recorded)
    from minc_train import engine  # noqa: F401
    torch.set_num_threads(a.threads)
    runs_dir = os.path.join(a.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    os.makedirs(a.work_dir, exist_ok=True)
    t0 = time.time()
    plan = [(r, m, s) for s in a.seed_list for r in a.recipe_list for m in a.method_list]
    if not a.replot:
        train, test = load_data(a)
        for s in a.seed_list:
            bpath = os.path.join(runs_dir, f"baselines-s{s}.json")
            if not os.path.isfile(bpath):
                rand, _ = build_backbone(a, s)
                write_json({"seed": s, "random_init": evaluate(rand, train, test, a, s),
                             "raw_pixels": evaluate(None, train, test, a, s, raw=True)}, bpath)
                print(f"baselines s{s}: {json.load(open(bpath))}", flush=True)
        for r, m, s in plan:
            path = os.path.join(runs_dir, run_name(r, m, s) + ".json")
            if os.path.isfile(path):
                continue
            rec = one_run(a, r, m, s, train, test)
            write_json(rec, path)
            print(f"{rec['run']}: {rec['status']}, probe {rec.get('probe_acc')}, kNN {rec.get('knn_acc')}, "
                  f"{rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU", flush=True)
    runs = [json.load(open(os.path.join(runs_dir, run_name(r, m, s) + ".json"))) for r, m, s in plan
            if os.path.isfile(os.path.join(runs_dir, run_name(r, m, s) + ".json"))]
    baselines = [json.load(open(os.path.join(runs_dir, f"baselines-s{s}.json"))) for s in a.seed_list
                 if os.path.isfile(os.path.join(runs_dir, f"baselines-s{s}.json"))]
    summary = summarize(runs, baselines, a.recipe_list, a.method_list)
    b = a.budget
    from minc_train.data import find_fashion_mnist
    meta = {"budget": b, "images_per_run": b["epochs"] * b["epoch_size"] // b["batch_size"] * b["batch_size"],
            "recipes": a.recipe_list, "methods": a.method_list, "seeds": a.seed_list,
            "lightly_recipe": {"optimizer": f"SGD(lr={a.lightly_lr}, momentum={a.lightly_sgd_momentum})",
                               "heads": a.heads, "ema": "update_momentum, cosine_schedule(step, steps, 0.996, 1)",
                               "loss": "0.5 * (criterion(p0, z1) + criterion(p1, z0))"},
            "runs_done": len(runs), "runs_planned": len(plan),
            "dataset": find_fashion_mnist(a.data_dir), "threads": a.threads,
            "command": "python -m minc_train.studies.minc_variants " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "this_invocation_wall_s": time.time() - t0,
            "sum_run_wall_s": sum(r.get("wall_s", 0) for r in runs),
            "sum_run_cpu_s": sum(r.get("cpu_s", 0) for r in runs),
            "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import lightly
        meta["lightly"] = lightly.__version__
    except ImportError:
        pass
    write_json({"meta": meta, "summary": summary, "runs": runs, "baselines": baselines},
                os.path.join(a.out, "results.json"))
    write_table(summary, meta, a.recipe_list, a.method_list, os.path.join(a.out, "table.md"))
    title = (f"MINC variants vs spectral/BYOL, Fashion-MNIST, {meta['images_per_run']:,} images per run, "
             f"{len(runs)}/{len(plan)} runs")
    plot(summary, runs, a.recipe_list, a.method_list, os.path.join(a.out, "minc_variants.png"), title)
    print(open(os.path.join(a.out, "table.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
