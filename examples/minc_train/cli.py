"""``minc-train``: self-supervised pre-training (MINC, spectral contrastive, MIO) + report.

With no arguments it pre-trains MINC on Fashion-MNIST with a CPU-sized configuration
(about 10 minutes on 2 idle cores), then reports the linear-probe accuracy of the learned
backbone features against raw pixels and against the same network at random init.
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
# options that define the loss: a resumed run must keep the checkpoint's values
_LOSS_OPTIONS = ("method", "ordering", "minc_ablation")
DATASETS = ("fashion-mnist", "folder")

# Defaults per preset, then per method (explicit command-line values always win).
_COMMON = dict(dataset="fashion-mnist", data_dir=None, loader="memory", image_size=None, holdout=0.1,
               stem="auto", width=32, pool=1, proj_layers=2, lr_scaling="linear",
               momentum=0.9, lars_eta=0.001, final_lr_ratio=0.0, ema_base=0.996, moment_momentum=0.99, normalize=False, stop_after=0, mu=1.0,
               ordering="standard", minc_ablation="none",
               backend=None, ema_backend="auto", amp="auto", device="auto", threads=0, workers=0, seed=0,
               eval_every=1, knn_k=20, knn_bank=10000, knn_queries=2000, eval_batch_size=512,
               probe_iters=200, probe_train_limit=0, probe_eval_limit=0, log_every=10)
PRESET_DEFAULTS = {
    "cpu": dict(arch="convnet", width=32, pool=2, batch_size=256, epochs=12, epoch_size=20000,
                warmup_epochs=1.0, augment="mild", proj_hidden=1024, proj_dim=128, pred_hidden=1024,
                amp="none", knn_bank=5000, knn_queries=1000, ema_backend="foreach"),
    "gpu": dict(arch="resnet18", batch_size=512, epochs=100, epoch_size=0, warmup_epochs=10.0,
                augment="byol", proj_hidden=4096, proj_dim=256, pred_hidden=4096, amp="auto",
                workers=8, knn_bank=0, knn_queries=0, eval_every=5),
}
METHOD_DEFAULTS = {
    "cpu": {"minc": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4, ema_base=0.99),
            "spectral": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4, mu=1.0),
            "mio": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4)},
    "gpu": {"minc": dict(optimizer="lars", lr=0.2, weight_decay=1.5e-6, augment="byol", normalize=True),
            "spectral": dict(optimizer="sgd", lr=0.03, weight_decay=5e-4, augment="simclr",
                             proj_hidden=2048, proj_dim=1000, mu=1.0),
            "mio": dict(optimizer="lars", lr=1.5, lr_scaling="none", weight_decay=1e-6,
                        augment="weak", proj_hidden=2048, proj_dim=128)},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minc-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults not shown depend on --preset and --method (see examples/minc_train/cli.py).")
    a = p.add_argument
    g = p.add_argument_group("what to train")
    g.add_argument("--method", choices=METHODS, default="minc", help="loss (default: minc)")
    g.add_argument("--preset", choices=PRESETS, default="cpu",
                   help="cpu: small conv net, ~10 min on 2 cores; gpu: ResNet-18, batch 512, 100 epochs, bf16")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help="fashion-mnist (default) or an ImageFolder tree (folder)")
    g.add_argument("--data-dir", help="folder: ImageFolder root (or root/train + root/val); "
                   "fashion-mnist: where the idx .gz files are / go")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download Fashion-MNIST with torchvision if not found (default: yes)")
    g.add_argument("--loader", choices=("memory", "stream"),
                   help="memory: load all images into one tensor, augment in batch (small data); "
                   "stream: DataLoader workers with per-image torchvision v2 transforms (ImageNet)")
    g.add_argument("--grayscale", action="store_true", help="folder: read images as 1-channel")
    g.add_argument("--holdout", type=float, help="held-out fraction when the folder has no val/ (0.1)")
    g.add_argument("--image-size", type=int, help="crop size (28 for Fashion-MNIST, 224 for folders)")
    g.add_argument("--augment", choices=("byol", "simclr", "weak", "mild"), help="view augmentations")
    g.add_argument("--epoch-size", type=int, help="images per epoch (0: the whole training set)")
    g.add_argument("--workers", type=int, help="DataLoader workers (stream loader)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=("convnet", "resnet18", "resnet50"))
    g.add_argument("--stem", choices=("auto", "imagenet", "s1", "s2"),
                   help="ResNet stem: imagenet 7x7/2+maxpool, s1/s2 3x3 conv stride 1/2 without maxpool")
    g.add_argument("--width", type=int, help="convnet base width")
    g.add_argument("--pool", type=int, help="convnet: pool the last map to pool x pool (features = 8*width*pool^2)")
    g.add_argument("--proj-hidden", type=int)
    g.add_argument("--proj-dim", type=int)
    g.add_argument("--proj-layers", type=int)
    g.add_argument("--pred-hidden", type=int, help="MINC predictor hidden width")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("lars", "sgd", "adamw"))
    g.add_argument("--lr", type=float, help="base learning rate (times batch/256 with --lr-scaling linear)")
    g.add_argument("--lr-scaling", choices=LR_SCALINGS,
                   help="lr = base lr x batch/256 (linear), x sqrt(batch/256) (sqrt, the rule for "
                   "adaptive optimisers such as AdamW), or as given (none)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--momentum", type=float, help="SGD/LARS momentum")
    g.add_argument("--lars-eta", type=float, help="LARS trust coefficient (0.001)")
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--final-lr-ratio", type=float, help="cosine decays to lr * this")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch (split over DDP processes)")
    g.add_argument("--ema-base", type=float, help="MINC target EMA: tau_base of the cosine schedule")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                   help="MINC: L2-normalise predictions and targets before the loss")
    g.add_argument("--moment-momentum", type=float, help="MINC: beta of the moment EMA M")
    g.add_argument("--ordering", choices=ORDERINGS,
                   help="MINC: gradient with the full moment M (standard, default) or its lower "
                   "triangle (gha: Generalized Hebbian ordering of the eigenfunctions)")
    g.add_argument("--minc-ablation", choices=MINC_ABLATIONS,
                   help="MINC ablation: none (default) or no-moment: drop the covariance term "
                   "p^T M p and train on the cross-correlation term alone, "
                   "-(2/B) sum_i (p1_i.t2_i + p2_i.t1_i) (the collapse study's control)")
    g.add_argument("--mu", type=float, help="spectral: mu")
    g.add_argument("--backend", choices=("auto", "triton", "reference"), help="minc_kernels loss backend")
    g.add_argument("--ema-backend", choices=("auto", "extension", "foreach"),
                   help="EMA update: auto (C++/CUDA extension if built), extension, foreach (torch._foreach_lerp_)")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), help="autocast (auto: bf16 on GPU)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    g.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("monitoring and output")
    g.add_argument("--out-dir", help="default runs/<method>-<dataset>-<timestamp>")
    g.add_argument("--resume", help="checkpoint file or run directory to continue")
    g.add_argument("--stop-after", type=int,
                   help="stop after this many epochs in this invocation (continue later with --resume)")
    g.add_argument("--eval-every", type=int, help="kNN/effective-rank evaluation every N epochs (0: never)")
    g.add_argument("--knn-k", type=int)
    g.add_argument("--knn-bank", type=int, help="training images in the kNN bank (0: all)")
    g.add_argument("--knn-queries", type=int, help="held-out images queried (0: all)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="final linear probes and report (default: yes)")
    g.add_argument("--probe-iters", type=int, help="L-BFGS iterations of the linear probe")
    g.add_argument("--probe-train-limit", type=int, help="training images for the probe (0: all)")
    g.add_argument("--probe-eval-limit", type=int, help="held-out images for the probe (0: all)")
    g.add_argument("--raw-probe", action="store_true", help="stream loader: also probe raw pixels")
    g.add_argument("--log-every", type=int)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    return p


def resolve_config(argv=None) -> argparse.Namespace:
    """Parse ``argv``; fill unset options from the checkpoint (``--resume``), the method and
    the preset defaults; validate.  Errors exit through ``parser.error`` (status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if v is not None}
    base = dict(_COMMON)
    if args.resume:
        import torch
        path = os.path.join(args.resume, "checkpoint.pt") if os.path.isdir(args.resume) else args.resume
        if not os.path.isfile(path):
            parser.error(f"--resume {args.resume!r}: no such checkpoint file")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        saved = dict(ck.get("config", {}))
        for k in ("resume", "progress", "probe", "stop_after"):
            saved.pop(k, None)
        base.update(saved)
        for k in _LOSS_OPTIONS:
            if k in explicit and k in saved and explicit[k] != saved[k]:
                parser.error(f"--{k.replace('_', '-')} {explicit[k]!r} differs from the checkpoint's "
                             f"{saved[k]!r}; a resumed run keeps its loss (start a new run instead)")
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
        parser.error("--data-dir is required with --dataset folder")
    if cfg.data_dir and not os.path.isdir(cfg.data_dir):
        parser.error(f"--data-dir {cfg.data_dir!r} does not exist or is not a directory")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr is not None and cfg.lr <= 0:
        parser.error(f"--lr must be > 0, got {cfg.lr}")
    if cfg.method == "mio" or cfg.method == "spectral":
        if cfg.batch_size < 2:
            parser.error("--batch-size must be >= 2 for the spectral and MIO losses")
    if cfg.method != "minc":
        for name, default in (("ordering", "standard"), ("minc_ablation", "none")):
            if getattr(cfg, name) != default:
                parser.error(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} applies to --method minc "
                             f"only (got --method {cfg.method})")
    if cfg.minc_ablation == "no-moment" and cfg.ordering != "standard":
        parser.error("--ordering gha has no effect with --minc-ablation no-moment (the ordering "
                     "acts on the moment term, which the ablation drops)")
    if not cfg.out_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.out_dir = os.path.join("runs", f"{cfg.method}-{cfg.dataset}-{stamp}")
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


def format_report(cfg, report: dict, history: list, plots: list, wall_s: float) -> str:
    import torch
    threads = torch.get_num_threads()
    names = {"minc": "MINC", "spectral": "Spectral contrastive", "mio": "MIO"}
    if cfg.method == "minc" and cfg.ordering == "gha":
        names["minc"] = "MINC (GHA ordering)"
    if cfg.method == "minc" and cfg.minc_ablation == "no-moment":
        names["minc"] = "MINC without the moment term (ablation)"
    last = history[-1] if history else {}
    lines = [f"{names[cfg.method]} pre-training on {cfg.dataset}: {cfg.arch}, {len(history)} epochs "
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
    return "\n".join(lines)


def run(argv=None) -> dict:
    """Train and report; returns the report dict (rank 0) or ``{}`` (other ranks)."""
    t0 = time.time()
    cfg = resolve_config(argv)
    _init_distributed(cfg)
    from .engine import Trainer
    from .plots import plot_history
    try:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            dist.barrier()
        try:
            trainer = Trainer(cfg)
        except (ValueError, FileNotFoundError) as exc:
            build_parser().error(str(exc))
        if rank == 0 and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                trainer.tb = SummaryWriter(os.path.join(cfg.out_dir, "tb"))
            except ImportError:
                print("tensorboard is not installed; logging to CSV only", file=sys.stderr)
        if rank == 0:
            print(f"minc-train: {cfg.method} on {cfg.dataset}, {cfg.arch} ({trainer.feat_dim}-d features), "
                  f"{cfg.epochs} epochs x {trainer.steps_per_epoch} steps of {cfg.batch_size}, "
                  f"{cfg.optimizer} lr {trainer.base_lr:g}, device {trainer.device}, "
                  f"world {trainer.world}; output in {cfg.out_dir}", flush=True)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(vars(cfg), f, indent=1, default=str)
        history = trainer.fit()
        if rank != 0:
            return {}
        report = {"config": vars(cfg), "history": history, "train_time_s": time.time() - t0}
        plots = plot_history(history, cfg.out_dir, f"{cfg.method} / {cfg.dataset} / {cfg.arch}")
        if cfg.probe:
            t1 = time.time()
            report["probes"] = trainer.final_report()
            report["probe_time_s"] = time.time() - t1
        report["wall_time_s"] = time.time() - t0
        report["cpu_time_s"] = time.process_time()  # this process, all threads
        report["plots"] = plots
        with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        text = format_report(cfg, report, history, plots, report["wall_time_s"])
        with open(os.path.join(cfg.out_dir, "report.txt"), "w") as f:
            f.write(text + "\n")
        print(text, flush=True)
        return report
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
