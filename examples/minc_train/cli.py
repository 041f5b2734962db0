"""``minc-train``: self-supervised pre-training (MINC, spectral contrastive, MIO) + report.

With no arguments it pre-trains MINC on Fashion-MNIST with a CPU-sized configuration
(about 5 minutes on 2 idle cores with AVX512-BF16: 4.8 min measured in
examples/results/train-default-cpu-2026-12-02-fresh-clone; CPUs without native bf16 run it
in fp32, about twice the time per step), then reports the linear-probe accuracy of the
learned backbone features against raw pixels and against the same network at random init.
``--preset gpu`` switches to the GPU recipes (ResNet-18, batch 512, 100 epochs, bf16).
Run under ``torchrun --nproc_per_node N`` for DDP.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .methods import MINC_ABLATIONS, METHODS

PRESETS = ("cpu", "gpu")
ORDERINGS = ("standard", "gha")
LR_SCALINGS = ("linear", "sqrt", "none")
DATASETS = ("fashion-mnist", "folder")

# --resume compares the options given again with the checkpoint's.  These cannot change in a
# resumed run (refused with one line): why, per option.
_WHY_FIXED = {
    "method": "a resumed run keeps its loss", "ordering": "a resumed run keeps its loss",
    "minc_ablation": "a resumed run keeps its loss",
    "preset": "--preset only picks the defaults of a new run",
    "dataset": "a resumed run keeps its data",
    "seed": "the seed fixes the held-out split, the data order and the random-init baseline",
    "holdout": "it changes the held-out split (held-out images would be trained on)",
    "batch_size": "the schedules count steps: the steps done would no longer match the epochs",
    "epoch_size": "the schedules count steps: the steps done would no longer match the epochs",
    "optimizer": "its optimiser state belongs to the checkpoint's optimiser",
    **{k: "the checkpoint's weights have the other shape" for k in (
        "arch", "stem", "width", "pool", "proj_hidden", "proj_dim", "proj_layers", "pred_hidden",
        "image_size", "grayscale")},
}
# These may change: the run continues with the new value and the start notes say what changes.
_RESUME_CHANGES = ("epochs", "lr", "lr_scaling", "warmup_epochs", "final_lr_ratio", "ema_base",
                   "moment_momentum", "weight_decay", "momentum", "lars_eta", "mu", "normalize",
                   "augment", "amp", "backend", "ema_backend", "loader", "data_dir", "sync_bn",
                   "device")
# The others (output, monitoring, threads, workers) do not change what is trained.  These
# belong to one invocation and are never taken from the checkpoint:
_PER_INVOCATION = ("resume", "stop_after", "overwrite", "out_dir")
# Files that mark a folder as holding a run (a new run there is refused without --overwrite)
# and what --overwrite removes.
RUN_MARKERS = ("checkpoint.pt", "log.csv", "report.json", "config.json")

# Defaults per preset, then per method (explicit command-line values always win).
_COMMON = dict(dataset="fashion-mnist", data_dir=None, loader="memory", image_size=None, holdout=0.1,
               stem="auto", width=32, pool=1, proj_layers=2, lr_scaling="linear", grayscale=False,
               sync_bn=False, raw_probe=False, tensorboard=False,
               momentum=0.9, lars_eta=0.001, final_lr_ratio=0.0, ema_base=0.996, moment_momentum=0.99, normalize=False, stop_after=0, mu=1.0,
               ordering="standard", minc_ablation="none",
               backend=None, ema_backend="auto", amp="auto", device="auto", threads=0, workers=0, seed=0,
               eval_every=1, knn_k=20, knn_bank=10000, knn_queries=2000, eval_batch_size=512,
               probe_iters=200, probe_train_limit=0, probe_eval_limit=0, log_every=10,
               download=True, probe=True, progress=True)
PRESET_DEFAULTS = {
    "cpu": dict(arch="convnet", width=32, pool=2, batch_size=256, epochs=12, epoch_size=20000,
                warmup_epochs=1.0, augment="mild", proj_hidden=1024, proj_dim=128, pred_hidden=1024,
                amp="auto", knn_bank=5000, knn_queries=1000, ema_backend="foreach"),
    "gpu": dict(arch="resnet18", batch_size=512, epochs=100, epoch_size=0, warmup_epochs=10.0,
                augment="byol", proj_hidden=4096, proj_dim=256, pred_hidden=4096, amp="auto",
                workers=8, knn_bank=0, knn_queries=0, eval_every=5),
}
METHOD_DEFAULTS = {
    # MINC default run: batch 128 at base lr 4e-3 (x128/256 = 2e-3): 89.80 % probe vs 89.18 / 88.75 %
    # at batch 256 (examples/results/train-default-cpu-2026-12-01), same images and CPU time
    "cpu": {"minc": dict(optimizer="adamw", lr=4e-3, batch_size=128, weight_decay=1e-4, ema_base=0.99),
            "spectral": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4, mu=1.0),
            "mio": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4),
            # the papers' 3-layer projector (8192 wide on ResNet-50's 2048 features), scaled
            "barlow": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4, proj_hidden=1024,
                           proj_dim=1024, proj_layers=3),
            "vicreg": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4, proj_hidden=1024,
                           proj_dim=1024, proj_layers=3)},
    "gpu": {"minc": dict(optimizer="lars", lr=0.2, weight_decay=1.5e-6, augment="byol", normalize=True),
            "spectral": dict(optimizer="sgd", lr=0.03, weight_decay=5e-4, augment="simclr",
                             proj_hidden=2048, proj_dim=1000, mu=1.0),
            "mio": dict(optimizer="lars", lr=1.5, lr_scaling="none", weight_decay=1e-6,
                        augment="weak", proj_hidden=2048, proj_dim=128),
            # 4x the ResNet-18's 512 features, as the papers' 8192 on ResNet-50's 2048 (untuned)
            "barlow": dict(optimizer="lars", lr=0.2, weight_decay=1.5e-6, augment="byol",
                           proj_hidden=2048, proj_dim=2048, proj_layers=3),
            "vicreg": dict(optimizer="lars", lr=0.2, weight_decay=1e-6, augment="byol",
                           proj_hidden=2048, proj_dim=2048, proj_layers=3)},
}


# Defaults that no preset/method table holds, as --help shows them.
_DEFAULT_TEXT = {
    "method": "minc",
    "preset": "cpu",
    "dataset": "fashion-mnist",
    "data_dir": "fashion-mnist: /usr/share/datasets/fashion-mnist, else downloaded into ./data",
    "image_size": "28 for Fashion-MNIST, 224 for folders",
    "augment": "mild on Fashion-MNIST; folders: cpu preset mild, gpu preset: minc byol, "
               "spectral simclr, mio weak, barlow and vicreg byol",
    "backend": "the loss modules' default (auto unless MINC_KERNELS_BACKEND says otherwise)",
    "out_dir": "runs/<method>-<dataset>-<timestamp>",
    "resume": "none (a new run)",
    "overwrite": "off: a new run refuses a folder that holds a run",
}
# Options that act on some methods only: --help shows their defaults for those.
_OPTION_METHODS = {"ema_base": ("minc",), "normalize": ("minc",), "pred_hidden": ("minc",),
                   "moment_momentum": ("minc",), "ordering": ("minc",), "minc_ablation": ("minc",),
                   "mu": ("spectral",)}


def _default_text(dest: str, default) -> str:
    """The default of option ``dest`` as --help shows it: the per-preset/per-method tables
    when the parser's own default is None (so that explicit values can be told apart)."""
    if dest in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[dest]
    if default is not None:
        return {True: "on", False: "off"}.get(default, str(default))
    per_preset = []
    for preset in PRESETS:
        vals = {}
        for method in _OPTION_METHODS.get(dest, METHODS):
            cfg = {**_COMMON, **PRESET_DEFAULTS[preset], **METHOD_DEFAULTS[preset][method]}
            v = cfg.get(dest)
            vals[method] = {True: "on", False: "off", None: "none"}.get(v, v) \
                if isinstance(v, (bool, type(None))) else v
        if len(set(map(str, vals.values()))) == 1:
            per_preset.append(str(next(iter(vals.values()))))
        else:
            per_preset.append(", ".join(f"{m} {v}" for m, v in vals.items()))
    if len(set(per_preset)) == 1:
        return per_preset[0]
    return "; ".join(f"{preset} preset: {text}" for preset, text in zip(PRESETS, per_preset))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minc-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults depend on --preset and --method where --help says so; a resumed run "
               "keeps the checkpoint's options (flags included) unless given again, except "
               "--stop-after, which counts the epochs of one invocation.")
    actions = []

    def add(group, *flags, **kw):
        actions.append(group.add_argument(*flags, **kw))

    g = p.add_argument_group("what to train")
    # method and preset default to None: a resumed run keeps the checkpoint's
    add(g, "--method", choices=METHODS, help="loss")
    add(g, "--preset", choices=PRESETS,
        help="cpu: small conv net, ~5 min on 2 idle cores; gpu: ResNet-18, batch 512, 100 epochs, bf16")
    g = p.add_argument_group("data")
    add(g, "--dataset", choices=DATASETS, help="Fashion-MNIST or an ImageFolder tree (folder)")
    add(g, "--data-dir", help="folder: ImageFolder root (or root/train + root/val); "
        "fashion-mnist: where the idx .gz files are / go")
    add(g, "--download", action=argparse.BooleanOptionalAction,
        help="download Fashion-MNIST with torchvision if not found")
    add(g, "--loader", choices=("memory", "stream"),
        help="memory: load all images into one tensor, augment in batch (small data); "
        "stream: DataLoader workers with per-image torchvision v2 transforms (ImageNet). "
        "Unreadable images are named on stderr and skipped")
    # store_true flags default to None, not False: a resumed run keeps the checkpoint's value
    add(g, "--grayscale", action="store_true", default=None, help="folder: read images as 1-channel")
    add(g, "--holdout", type=float, help="held-out fraction when the folder has no val/")
    add(g, "--image-size", type=int, help="crop size")
    add(g, "--augment", choices=("byol", "simclr", "weak", "mild"), help="view augmentations")
    add(g, "--epoch-size", type=int, help="images per epoch (0: the whole training set)")
    add(g, "--workers", type=int, help="DataLoader workers (stream loader)")
    g = p.add_argument_group("model")
    add(g, "--arch", choices=("convnet", "resnet18", "resnet50"), help="backbone")
    add(g, "--stem", choices=("auto", "imagenet", "s1", "s2"),
        help="ResNet stem: imagenet 7x7/2 conv + maxpool; s1/s2 3x3 conv of stride 1/2 without "
        "maxpool (small images). auto: s1 below 96 px, imagenet from 96 px. s1 keeps the full "
        "resolution into the first stage, 16x the positions of imagenet at the same size, so "
        "a ResNet at e.g. 64 px costs many times more per image with auto than with imagenet")
    add(g, "--width", type=int, help="convnet base width")
    add(g, "--pool", type=int, help="convnet: pool the last map to pool x pool (features = 8*width*pool^2)")
    add(g, "--proj-hidden", type=int, help="projector hidden width")
    add(g, "--proj-dim", type=int, help="projector output width (the loss's k)")
    add(g, "--proj-layers", type=int, help="projector linear layers")
    add(g, "--pred-hidden", type=int, help="MINC predictor hidden width")
    add(g, "--sync-bn", action="store_true", default=None, help="SyncBatchNorm under DDP")
    g = p.add_argument_group("optimisation")
    add(g, "--optimizer", choices=("lars", "sgd", "adamw"), help="optimiser")
    add(g, "--lr", type=float, help="base learning rate (times batch/256 with --lr-scaling linear)")
    add(g, "--lr-scaling", choices=LR_SCALINGS,
        help="lr = base lr x batch/256 (linear), x sqrt(batch/256) (sqrt, the rule for "
        "adaptive optimisers such as AdamW), or as given (none)")
    add(g, "--weight-decay", type=float, help="weight decay (LARS/SGD/AdamW)")
    add(g, "--momentum", type=float, help="SGD/LARS momentum")
    add(g, "--lars-eta", type=float, help="LARS trust coefficient")
    add(g, "--warmup-epochs", type=float, help="linear lr warm-up, then cosine decay")
    add(g, "--final-lr-ratio", type=float, help="cosine decays to lr * this")
    add(g, "--epochs", type=int, help="training epochs (the schedules' length)")
    add(g, "--batch-size", type=int, help="global batch (split over DDP processes)")
    add(g, "--ema-base", type=float, help="MINC target EMA: tau_base of the cosine schedule")
    add(g, "--normalize", action=argparse.BooleanOptionalAction,
        help="MINC with --minc-ablation no-moment: L2-normalise predictions and targets before "
        "the cross term (BYOL's loss up to constants). The full MINC loss L2-normalises them "
        "itself (MINCLoss feature_norm='l2', the library default), so there the flag changes nothing")
    add(g, "--moment-momentum", type=float, help="MINC: beta of the moment EMA M")
    add(g, "--ordering", choices=ORDERINGS,
        help="MINC: gradient with the full moment M (standard) or its lower "
        "triangle (gha: Generalized Hebbian ordering of the eigenfunctions)")
    add(g, "--minc-ablation", choices=MINC_ABLATIONS,
        help="MINC ablation: none or no-moment: drop the covariance term "
        "p^T M p and train on the cross-correlation term alone, "
        "-(2/B) sum_i (p1_i.t2_i + p2_i.t1_i) (the collapse study's control)")
    add(g, "--mu", type=float, help="spectral: mu")
    add(g, "--backend", choices=("auto", "triton", "reference"), help="minc_kernels loss backend")
    add(g, "--ema-backend", choices=("auto", "extension", "foreach"),
        help="EMA update: auto (C++/CUDA extension if built), extension, foreach (torch._foreach_lerp_)")
    add(g, "--amp", choices=("auto", "none", "bf16", "fp16"), help="autocast (auto: bf16 on GPU and on CPUs with AVX512-BF16/AMX, else none)")
    add(g, "--device", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    add(g, "--threads", type=int, help="torch CPU threads (0: chosen by timing the training steps "
        "with all cores vs 1, again from time to time; a fixed count makes runs bit-exact)")
    add(g, "--seed", type=int, help="seed of the model, data order and augmentations")
    g = p.add_argument_group("monitoring and output")
    add(g, "--out-dir", help="run directory (log, checkpoint, plots, report)")
    add(g, "--resume", help="checkpoint file or run directory to continue (options given again are "
        "checked against the checkpoint's: those that fix the model, data or step count are refused, "
        "the others are applied and said at the start)")
    add(g, "--overwrite", action="store_true", default=None,
        help="start a new run in an --out-dir that holds one: its checkpoint, log, report and plots "
        "are deleted")
    add(g, "--stop-after", type=int,
        help="stop after this many epochs in this invocation (0: no limit; continue later with --resume)")
    add(g, "--eval-every", type=int, help="kNN/effective-rank evaluation every N epochs (0: never)")
    add(g, "--knn-k", type=int, help="neighbours of the kNN classifier")
    add(g, "--knn-bank", type=int, help="training images in the kNN bank (0: all)")
    add(g, "--knn-queries", type=int, help="held-out images queried (0: all)")
    add(g, "--eval-batch-size", type=int, help="batch size of feature extraction")
    add(g, "--probe", action=argparse.BooleanOptionalAction,
        help="final linear probes and report")
    add(g, "--probe-iters", type=int, help="L-BFGS iterations of the linear probe")
    add(g, "--probe-train-limit", type=int, help="training images for the probe (0: all)")
    add(g, "--probe-eval-limit", type=int, help="held-out images for the probe (0: all)")
    add(g, "--raw-probe", action="store_true", default=None, help="stream loader: also probe raw pixels")
    add(g, "--log-every", type=int, help="steps between loss checks on the progress bar")
    add(g, "--progress", action=argparse.BooleanOptionalAction, help="tqdm bars")
    add(g, "--tensorboard", action="store_true", default=None, help="also log to TensorBoard (if installed)")
    for act in actions:
        act.help = f"{act.help} (default: {_default_text(act.dest, act.default)})"
    return p


def _fail(parser: argparse.ArgumentParser, msg: str):
    """One clear line and exit status 2, as argparse's errors but without the usage text."""
    parser.exit(2, f"{parser.prog}: error: {msg}\n")


def resolve_config(argv=None) -> argparse.Namespace:
    """Parse ``argv``; fill unset options from the checkpoint (``--resume``), the method and
    the preset defaults; validate.  Errors exit with status 2: argparse's own with the usage
    text, the others with one line naming the option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if v is not None}
    base = dict(_COMMON)
    if args.resume:
        from . import checkpoint as C
        path = os.path.join(args.resume, "checkpoint.pt") if os.path.isdir(args.resume) else args.resume
        if not os.path.isfile(path):
            _fail(parser, f"--resume {args.resume!r}: no such checkpoint file")
        if args.overwrite and not args.out_dir:
            _fail(parser, "--overwrite with --resume would delete the run being continued; give "
                         "another --out-dir to continue it there")
        try:
            ck = C.read(path, keep=True)  # verified here; the Trainer gets it without a second load
        except C.CheckpointError as exc:
            _fail(parser, str(exc))
        saved = dict(ck["config"])
        for k in _PER_INVOCATION:
            saved.pop(k, None)
        base.update(saved)
        for k, why in _WHY_FIXED.items():
            if k in explicit and k in saved and explicit[k] != saved[k]:
                _fail(parser, f"--{k.replace('_', '-')} {explicit[k]!r} differs from the checkpoint's "
                             f"{saved[k]!r} ({why}); resume without it, or start a new run in "
                             "another --out-dir")
        if not args.out_dir:
            explicit["out_dir"] = os.path.dirname(os.path.abspath(path))
    method = explicit.get("method", base.get("method", "minc"))
    preset = explicit.get("preset", base.get("preset", "cpu"))
    cfg = {k: None for k in vars(args)}
    cfg.update(base)
    if not args.resume:
        cfg.update(PRESET_DEFAULTS[preset])
        cfg.update(METHOD_DEFAULTS[preset][method])
    if not args.resume and cfg.get("dataset") == "fashion-mnist" and "augment" not in explicit \
            and explicit.get("dataset", "fashion-mnist") == "fashion-mnist":
        cfg["augment"] = "mild"  # 28-px greyscale: mild views whatever the preset (RECIPES.md)
    cfg.update(explicit)
    cfg["method"], cfg["preset"] = method, preset
    cfg = argparse.Namespace(**cfg)
    # validation with messages that name the option
    if cfg.dataset == "folder" and not cfg.data_dir:
        _fail(parser, "--data-dir is required with --dataset folder")
    if cfg.data_dir and not os.path.isdir(cfg.data_dir):
        _fail(parser, f"--data-dir {cfg.data_dir!r} does not exist or is not a directory")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            _fail(parser, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr is not None and cfg.lr <= 0:
        _fail(parser, f"--lr must be > 0, got {cfg.lr}")
    if cfg.method in ("mio", "spectral", "barlow", "vicreg"):
        if cfg.batch_size < 2:
            _fail(parser, "--batch-size must be >= 2 for the spectral, MIO, Barlow Twins and "
                          "VICReg losses")
    if cfg.method != "minc":
        for name, default in (("ordering", "standard"), ("minc_ablation", "none")):
            if getattr(cfg, name) != default:
                _fail(parser, f"--{name.replace('_', '-')} {getattr(cfg, name)!r} applies to --method minc "
                             f"only (got --method {cfg.method})")
    if cfg.minc_ablation == "no-moment" and cfg.ordering != "standard":
        _fail(parser, "--ordering gha has no effect with --minc-ablation no-moment (the ordering "
                     "acts on the moment term, which the ablation drops)")
    if not cfg.out_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.out_dir = os.path.join("runs", f"{cfg.method}-{cfg.dataset}-{stamp}")
        base_dir, n = cfg.out_dir, 1
        while os.path.exists(cfg.out_dir):  # two runs started in the same second: a new folder
            n += 1
            cfg.out_dir = f"{base_dir}-{n}"
    return cfg


def _init_distributed(cfg) -> None:
    """Under torchrun (WORLD_SIZE > 1): init the process group (the engine's one place for it)
    and agree on rank 0's output directory."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist
    from .engine import init_distributed
    init_distributed(cfg.device)
    obj = [cfg.out_dir]
    dist.broadcast_object_list(obj, src=0)
    cfg.out_dir = obj[0]


def resume_command(cfg) -> str:
    """The command that continues the run in ``cfg.out_dir``."""
    import shlex
    return f"minc-train --resume {shlex.quote(cfg.out_dir)}"


def format_report(cfg, report: dict, history: list, plots: list, wall_s: float) -> str:
    import torch
    threads = torch.get_num_threads()
    names = {"minc": "MINC", "spectral": "Spectral contrastive", "mio": "MIO",
             "barlow": "Barlow Twins", "vicreg": "VICReg"}
    if cfg.method == "minc" and cfg.ordering == "gha":
        names["minc"] = "MINC (GHA ordering)"
    if cfg.method == "minc" and cfg.minc_ablation == "no-moment":
        names["minc"] = "MINC without the moment term (ablation)"
    last = history[-1] if history else {}
    done = int(last.get("epoch", 0))
    noun = "epoch" if cfg.epochs == 1 else "epochs"
    epochs = f"{done} {noun}" if done >= cfg.epochs else f"{done} of {cfg.epochs} {noun}"
    lines = [f"{names[cfg.method]} pre-training on {cfg.dataset}: {cfg.arch}, {epochs} "
             f"({last.get('step', 0)} steps of batch {cfg.batch_size}), wall time {wall_s / 60:.1f} min, "
             f"CPU time {report.get('cpu_time_s', float('nan')) / 60:.1f} min ({threads} threads)"]
    probes = report.get("probes", {})
    if probes:
        lines.append("Linear probe (logistic regression on standardised features, L-BFGS "
                     f"{cfg.probe_iters} it., train split -> held-out split), accuracy:")
        rows = [(f"{names[cfg.method]} backbone features", probes.get("ssl")),
                ("same network, random init", probes.get("random_init")),
                ("raw pixels", probes.get("raw_pixels"))]
        for label, r in rows:
            if r:
                lines.append(f"  {label + ' (' + str(r['dim']) + '-d)':<44} {r['test_acc']:6.2f} %")
        if probes.get("ssl") and probes.get("raw_pixels") and probes.get("random_init"):
            ssl = probes["ssl"]["test_acc"]
            lines.append(f"  vs raw pixels {ssl - probes['raw_pixels']['test_acc']:+.2f} pts, "
                         f"vs random init {ssl - probes['random_init']['test_acc']:+.2f} pts")
    if isinstance(last.get("knn_acc"), float):
        lines.append(f"kNN accuracy (k={cfg.knn_k}) after the last epoch: {last['knn_acc']:.2f} %, "
                     f"effective rank of backbone features {last.get('eff_rank', float('nan')):.1f}")
    lines.append(f"CSV log: {os.path.join(cfg.out_dir, 'log.csv')}")
    for p in plots:
        lines.append(f"plot: {p}")
    lines.append(f"report: {os.path.join(cfg.out_dir, 'report.json')}; checkpoint: "
                 f"{os.path.join(cfg.out_dir, 'checkpoint.pt')}")
    if done < cfg.epochs:
        lines.append(f"Stopped after epoch {done} of {cfg.epochs} (--stop-after {cfg.stop_after}); "
                     f"continue with: {resume_command(cfg)}")
    return "\n".join(lines)


def _warn(msg: str) -> None:
    print(f"minc-train: warning: {msg}", file=sys.stderr, flush=True)


def _die(msg: str, code: int = 1):
    """One line on stderr and exit status ``code`` (1: the run failed; 2: the command line)."""
    print(f"minc-train: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _git(*args) -> str | None:
    """``git <args>`` in the checkout this program runs from (None outside one)."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str | None:
    """The commit of the checkout this program runs from (None outside a git checkout)."""
    out = _git("rev-parse", "HEAD")
    return (out or "").strip() or None


def _git_dirty() -> bool | None:
    """Whether tracked files of that checkout differ from its commit (None outside one)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def _version(module: str, load: bool = False) -> str | None:
    """``module.__version__`` if it is imported (or ``load``: importable), else its installed
    distribution's version (None when it is not installed): triton is not imported just to
    read it (the local build suffix, e.g. +cu130, is only in ``__version__``)."""
    import importlib
    from importlib import metadata
    if load and module not in sys.modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return None
    if module in sys.modules:
        v = getattr(sys.modules[module], "__version__", None)
        if v is not None:
            return str(v)
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def backends_used(cfg, trainer) -> dict:
    """The loss and EMA backends this run actually used (``auto`` resolved), from
    ``minc_kernels.info`` where the choice is the library's."""
    try:
        from minc_kernels import info
        facts = info.collect()
    except Exception as exc:  # noqa: BLE001  (a report without these facts, not a failed run)
        facts = {"error": f"{type(exc).__name__}: {exc}"}
    out = {"loss_backend": cfg.backend or "auto"}
    loss_text = (facts.get("loss_backends") or {}).get(cfg.method)
    if out["loss_backend"] == "auto" and loss_text:
        out["loss_backend_detail"] = loss_text
    if trainer.target is None:
        out["ema_backend"] = None  # no EMA target in this method
        return out
    ema_text = facts.get("ema_backend")
    if cfg.ema_backend == "foreach":
        used = "foreach"
    elif cfg.ema_backend == "extension":
        used = "extension"
    elif ema_text is None:
        used = "unknown"
    elif ema_text.startswith("torch._foreach_lerp_") or (
            trainer.device.type == "cuda" and "no CUDA kernel" in ema_text):
        used = "foreach"
    else:
        used = "extension"
    out["ema_backend"] = used
    if ema_text:
        out["ema_backend_detail"] = ema_text
    return out


def environment(trainer) -> dict:
    """Versions, commit (and whether the checkout had uncommitted changes), the device and
    the backends actually used (``--device``, ``--backend``, ``--ema-backend auto`` resolved)."""
    import platform
    import torch
    import minc_kernels
    dev = trainer.device
    return {"torch": torch.__version__, "minc_kernels": minc_kernels.__version__,
            "minc_train": _version("minc_train"), "triton": _version("triton"),
            "torchvision": _version("torchvision", load=True), "numpy": _version("numpy", load=True),
            "python": platform.python_version(), "git_commit": _git_commit(),
            "git_dirty": _git_dirty(),
            "device": str(dev),
            "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                            else platform.processor() or platform.machine()),
            "world_size": trainer.world, "threads": torch.get_num_threads(),
            "precision": _precision(trainer.cfg), **backends_used(trainer.cfg, trainer)}


def _precision(cfg) -> str:
    return "fp32" if cfg.amp == "none" else f"{cfg.amp} autocast"


def _lr_scale(scaling: str, batch: int) -> float:
    import math
    return {"linear": batch / 256, "sqrt": math.sqrt(batch / 256), "none": 1.0}[scaling]


def _resume_notes(cfg, trainer) -> list[str]:
    """What a resumed run changes: one note per option given again with another value than
    the checkpoint's (the options of :data:`_RESUME_CHANGES`), then the lr and EMA momentum
    at the join when the schedules change."""
    from minc_kernels import cosine_momentum
    from .optim import warmup_cosine
    old = trainer.resumed_config or {}
    if trainer.start_epoch >= cfg.epochs:
        return []
    notes, changed = [], []
    for k in _RESUME_CHANGES:
        if k not in old:
            continue
        new_v, old_v = getattr(cfg, k), old[k]
        if k == "backend":  # None: the loss modules' default, which is auto
            new_v, old_v = new_v or "auto", old_v or "auto"
        if k == "data_dir" and new_v and old_v and os.path.realpath(new_v) == os.path.realpath(old_v):
            continue
        if new_v == old_v or (k == "epochs" and int(old_v) == int(new_v)):
            continue
        changed.append(k)
        flag = f"--{k.replace('_', '-')} {new_v}"
        if k == "epochs":
            notes.append(f"{flag} differs from the checkpoint's {old_v}: the cosine schedules are "
                         f"recomputed for {cfg.epochs} epochs")
        elif k == "moment_momentum":
            notes.append(f"{flag} differs from the checkpoint's {old_v}: M (kept) is updated with "
                         f"beta {new_v} from here, and its bias correction 1/(1-beta^n) changes at the join")
        else:
            notes.append(f"{flag} differs from the checkpoint's {old_v}: the remaining "
                         f"{cfg.epochs - trainer.start_epoch} epochs use it")
    lr_keys = {"epochs", "lr", "lr_scaling", "warmup_epochs", "final_lr_ratio"}
    if not changed or not (set(changed) & (lr_keys | {"ema_base"})):
        return notes
    try:
        o = {k: old.get(k, getattr(cfg, k)) for k in lr_keys | {"ema_base"}}
        spe, s = trainer.steps_per_epoch, trainer.step
        old_total, old_base = spe * int(o["epochs"]), float(o["lr"]) * _lr_scale(o["lr_scaling"], cfg.batch_size)
        old_warm = int(round(float(o["warmup_epochs"]) * spe))
        lr_a = warmup_cosine(s, old_total, old_warm, old_base, old_base * float(o["final_lr_ratio"]))
    except (KeyError, TypeError, ValueError):  # an older checkpoint without these options
        return notes
    lr_b = warmup_cosine(s, trainer.total_steps, trainer.warmup_steps, trainer.base_lr,
                         trainer.base_lr * cfg.final_lr_ratio)
    msg = f"so at the join (step {s}) the lr goes from {lr_a:.4g} to {lr_b:.4g}"
    if trainer.target is not None:
        m_a = cosine_momentum(min(s, old_total), old_total, float(o["ema_base"]))
        m_b = cosine_momentum(s, trainer.total_steps, cfg.ema_base)
        msg += f" and the EMA momentum from {m_a:.6g} to {m_b:.6g}"
    notes[-1] += f"; {msg}" if len(notes) == 1 else ""
    if len(notes) > 1:
        notes.append(f"with these changes, {msg}")
    return notes


def start_notes(cfg, trainer) -> list[str]:
    """What a user should know before the run starts: a warm-up longer than the run, a
    single class, what a resumed run changes (:func:`_resume_notes`)."""
    from .optim import warmup_cosine
    notes = []
    if trainer.warmup_steps > trainer.total_steps > 0:
        peak = warmup_cosine(trainer.total_steps - 1, trainer.total_steps, trainer.warmup_steps,
                             trainer.base_lr)
        notes.append(f"the lr warm-up ({cfg.warmup_epochs:g} epochs, {trainer.warmup_steps} steps) is "
                     f"longer than the run ({cfg.epochs} epochs, {trainer.total_steps} steps): "
                     f"the lr never reaches its base value {trainer.base_lr:g} (it peaks at "
                     f"{peak:.3g}); lower --warmup-epochs")
    if trainer.num_classes < 2:
        notes.append("the data has a single class: the kNN and linear-probe accuracies are 100 % "
                     "by construction and say nothing about the features")
    if trainer.resumed_config is not None:
        notes.extend(_resume_notes(cfg, trainer))
    return notes


# ---------------------------------------------------------------------- the run folder
def _holds_run(path: str) -> list[str]:
    """The files of :data:`RUN_MARKERS` in folder ``path``."""
    return [f for f in RUN_MARKERS if os.path.exists(os.path.join(path, f))]


def check_out_dir(cfg) -> None:
    """Before anything is built: the run folder can be created and written, and a new run
    does not replace another by accident.  Exits with one line otherwise."""
    import tempfile
    out = cfg.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        _die(f"--out-dir {out!r} is a file, not a folder; choose another --out-dir", 2)
    probe_dir = os.path.abspath(out)
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        _die(f"--out-dir {out!r} cannot be created: {probe_dir} is a file, not a folder", 2)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".minc-train-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        _die(f"--out-dir {out!r}: cannot write in {probe_dir} ({exc.strerror or exc}); choose a "
             "writable --out-dir", 2)
    if not os.path.isdir(out):
        return
    found = _holds_run(out)
    if not found:
        return
    same = False
    if cfg.resume:
        ck = os.path.join(cfg.resume, "checkpoint.pt") if os.path.isdir(cfg.resume) else cfg.resume
        same = os.path.realpath(os.path.dirname(os.path.abspath(ck))) == os.path.realpath(out)
    if same and cfg.overwrite:
        _die("--overwrite with --resume would delete the run being continued; give another "
             "--out-dir to continue it there", 2)
    if same or cfg.overwrite:
        return
    hint = f"continue it with --resume {out}, " if "checkpoint.pt" in found and not cfg.resume else ""
    _die(f"--out-dir {out!r} already holds a run ({', '.join(found)}); {hint}replace it with "
         "--overwrite, or choose another --out-dir", 2)


def clear_run(out_dir: str) -> list[str]:
    """Delete a previous run's files in ``out_dir`` (``--overwrite``): checkpoint, log,
    reports, config, plots, TensorBoard folder, partial files.  Returns what was deleted."""
    import glob
    import shutil
    from .plots import PLOTS
    names = list(RUN_MARKERS) + ["report.txt"] + [p[2] for p in PLOTS]
    gone = []
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.unlink(path)
            gone.append(name)
    for pattern in [f"{n}.*.tmp" for n in names]:
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            os.unlink(path)
            gone.append(os.path.basename(path))
    if os.path.isdir(os.path.join(out_dir, "tb")):
        shutil.rmtree(os.path.join(out_dir, "tb"))
        gone.append("tb/")
    return gone


LOCK = ".minc-train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def lock_run(out_dir: str) -> str:
    """Take the run folder for this process (``<out_dir>/.minc-train.lock`` holding its pid):
    a second minc-train on the same folder is refused with one line while the first runs;
    the lock of a killed run is taken over.  Returns the lock's path (:func:`unlock_run`)."""
    path = os.path.join(out_dir, LOCK)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                _die(f"--out-dir {out_dir!r} is in use by another minc-train (pid {pid}); wait for it "
                     f"or choose another --out-dir (if no such run is going on, delete {path})", 2)
            try:
                os.unlink(path)  # left by a run that was killed
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return path
    _die(f"--out-dir {out_dir!r}: could not take {path}", 2)


def unlock_run(path: str) -> None:
    try:
        with open(path) as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:
            os.unlink(path)
    except (OSError, ValueError):
        pass


def write_atomic(path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename: a run killed meanwhile
    leaves the previous file, never a truncated one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _storage_error(exc: OSError, out_dir: str) -> str | None:
    """One line for an OSError on a file of the run folder (full disk, read-only, ...), or
    None for other errors (those keep their traceback)."""
    from . import checkpoint as C
    name = exc.filename if isinstance(exc.filename, str) else None
    if exc.errno not in C.STORAGE_ERRNOS or not name:
        return None
    root = os.path.realpath(out_dir)
    full = os.path.realpath(name)
    if full != root and not full.startswith(root + os.sep):
        return None
    return f"cannot write {name}: {C._storage_message(exc)}"


def run(argv=None) -> dict:
    """Train and report; returns the report dict (rank 0) or ``{}`` (other ranks)."""
    import shutil
    from . import checkpoint as C
    t0 = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = resolve_config(argv)
    check_out_dir(cfg)
    _init_distributed(cfg)
    from .engine import Trainer
    from .plots import plot_history
    rank = int(os.environ.get("RANK", "0"))
    state = {"created": False}  # whether this invocation created the run folder

    def train_and_report() -> dict:
        try:
            trainer = Trainer(cfg)
        except (ValueError, FileNotFoundError) as exc:  # data, option and checkpoint errors: one line
            _fail(build_parser(), str(exc))
        report_path = os.path.join(cfg.out_dir, "report.json")
        if trainer.start_epoch >= cfg.epochs:
            if rank == 0:
                print(f"minc-train: {cfg.out_dir} has finished its {cfg.epochs} epochs ({trainer.step} "
                      "steps); nothing to train (give a larger --epochs to continue it)", flush=True)
            saved = None
            if os.path.isfile(report_path):  # done: keep the report, do not redo the probes
                try:
                    with open(report_path) as f:
                        saved = json.load(f)
                except (OSError, ValueError) as exc:
                    if rank == 0:
                        _warn(f"{report_path} is unreadable ({type(exc).__name__}); writing it again")
            if saved is not None:
                if rank == 0:
                    print(f"minc-train: its report is {report_path} (left unchanged)", flush=True)
                    return saved
                return {}
        # the run directory only now: a run that fails to start leaves none behind
        if rank == 0:
            created = state["created"] = not os.path.isdir(cfg.out_dir)
            os.makedirs(cfg.out_dir, exist_ok=True)
            state["lock"] = lock_run(cfg.out_dir)
            if cfg.overwrite and not created:
                gone = clear_run(cfg.out_dir)
                if gone:
                    print(f"minc-train: --overwrite: deleted the previous run's {', '.join(gone)} in "
                          f"{cfg.out_dir}", flush=True)
            stale = [s for name in RUN_MARKERS + ("report.txt",)
                     for s in C.remove_stale_tmp(os.path.join(cfg.out_dir, name))]
            if stale:
                _warn(f"removed {len(stale)} partial file(s) left by an interrupted run: "
                      f"{', '.join(os.path.basename(s) for s in stale)}")
            if trainer.resumed_verified is False:
                _warn(f"{cfg.resume}: the checkpoint has no digest (written by an older minc-train), "
                      "so it was loaded without an integrity check; the next one will have it")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            dist.barrier()
        if rank == 0 and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                trainer.tb = SummaryWriter(os.path.join(cfg.out_dir, "tb"))
            except ImportError:
                print("tensorboard is not installed; logging to CSV only", file=sys.stderr)
        notes = start_notes(cfg, trainer)
        if rank == 0:
            print(f"minc-train: {cfg.method} on {cfg.dataset}, {cfg.arch} ({trainer.feat_dim}-d features), "
                  f"{cfg.epochs} epochs x {trainer.steps_per_epoch} steps of {cfg.batch_size}, "
                  f"{cfg.optimizer} lr {trainer.base_lr:g}, {_precision(cfg)}, device {trainer.device}, "
                  f"world {trainer.world}; output in {cfg.out_dir}", flush=True)
            for note in notes:
                _warn(note)
            write_atomic(os.path.join(cfg.out_dir, "config.json"),
                         json.dumps(vars(cfg), indent=1, default=str))
        history = trainer.fit()
        if rank != 0:
            return {}
        done = int(history[-1]["epoch"]) if history else 0
        finished = done >= cfg.epochs
        report = {"config": vars(cfg), "argv": ["minc-train", *argv],
                  "finished": finished, "epochs_done": done,
                  "lr": {"base": cfg.lr, "scaling": cfg.lr_scaling, "effective": trainer.base_lr,
                         "rule": f"{cfg.lr:g} x {_lr_scale(cfg.lr_scaling, cfg.batch_size):g} "
                                 f"({cfg.lr_scaling}, batch {cfg.batch_size}), then warm-up and cosine"},
                  "environment": environment(trainer), "notes": notes,
                  "history": history, "train_time_s": time.time() - t0}
        if not finished:
            report["resume_command"] = resume_command(cfg)
        plots = plot_history(history, cfg.out_dir, f"{cfg.method} / {cfg.dataset} / {cfg.arch}")
        if cfg.probe:
            t1 = time.time()
            report["probes"] = trainer.final_report()
            report["probe_time_s"] = time.time() - t1
        report["wall_time_s"] = time.time() - t0
        report["cpu_time_s"] = time.process_time()  # this process, all threads
        report["plots"] = plots
        write_atomic(report_path, json.dumps(report, indent=1, default=str))
        text = format_report(cfg, report, history, plots, report["wall_time_s"])
        write_atomic(os.path.join(cfg.out_dir, "report.txt"), text + "\n")
        print(text, flush=True)
        return report
    try:
        try:
            return train_and_report()
        except C.CheckpointWriteError as exc:
            if os.path.isfile(os.path.join(cfg.out_dir, "checkpoint.pt")):
                _die(f"{exc}; free space or choose a writable folder, then continue with "
                     f"{resume_command(cfg)}")
            _die(f"{exc}; free space or choose a writable --out-dir")
        except OSError as exc:
            line = _storage_error(exc, cfg.out_dir)
            if line is None:
                raise
            _die(line)
    except BaseException:
        # a run that fails before its first checkpoint leaves no run directory behind
        if state["created"] and not os.path.isfile(os.path.join(cfg.out_dir, "checkpoint.pt")):
            shutil.rmtree(cfg.out_dir, ignore_errors=True)
            print(f"minc-train: removed {cfg.out_dir} (the run stopped before its first checkpoint)",
                  file=sys.stderr, flush=True)
        raise
    finally:
        if state.get("lock"):
            unlock_run(state["lock"])
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
