"""The training loop: setup (data, model, loss, optimiser, DDP), epochs, evaluation,
atomic checkpoints with exact resume, and the final linear-probe report."""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from minc_kernels.ema import MomentumEncoder, cosine_momentum, ema_update_
from minc_kernels.losses import MINCLoss, MIOLoss, SpectralContrastiveLoss
from . import data as D
from .metrics import CSVLogger, effective_rank, knn_accuracy, linear_probe
from .models import SSLModel, build_backbone, mlp
from .optim import build_optimizer, warmup_cosine

METHODS = ("minc", "spectral", "mio")
LOG_FIELDS = ["epoch", "step", "loss", "lr", "ema_momentum", "knn_acc", "eff_rank", "proj_eff_rank",
              "epoch_time_s", "step_time_s", "elapsed_s", "cpu_time_s"]


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729 + 12_345) % (2 ** 62)


# ---------------------------------------------------------------------- RNG state <-> tensors
def rng_state() -> dict:
    """Every RNG state as tensors/plain values (loadable with ``weights_only=True``)."""
    py = random.getstate()
    npst = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64),
                      "gauss": py[2]},
           "numpy": {"keys": torch.from_numpy(npst[1].astype(np.int64)), "pos": int(npst[2]),
                     "has_gauss": int(npst[3]), "cached": float(npst[4])}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temp file in the same directory, then ``os.replace``."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def ema_step(enc: MomentumEncoder, momentum: float, backend: str = "auto", check_finite: bool = True) -> None:
    """``enc.update(momentum)`` with a choice of :func:`minc_kernels.ema_update_` backend
    (``auto``: the compiled extension if built, ``foreach``: ``torch._foreach_lerp_``).
    Parameters and floating buffers are averaged, integer buffers copied."""
    tp, op = list(enc.target.parameters()), list(enc.online.parameters())
    lt, lo, ct, co = list(tp), list(op), [], []
    for t, o in zip(enc.target.buffers(), enc.online.buffers()):
        (lt if t.is_floating_point() else ct).append(t)
        (lo if t.is_floating_point() else co).append(o)
    ema_update_(lt, lo, momentum, check_finite=check_finite, backend=backend)
    for t, o in zip(ct, co):
        t.copy_(o)


def minc_no_moment_loss(p, t) -> torch.Tensor:
    """MINC without its covariance term: ``-(2/B) Σ_i p_i·t_i`` per pair, summed over the
    pairs when ``p`` and ``t`` are tuples (symmetric use: ``((p1, p2), (t2, t1))``).
    ``t`` is treated as stop-gradient.  Unbounded below (nothing stops the norms growing)."""
    if isinstance(p, torch.Tensor):
        p, t = (p,), (t,)
    if len(p) != len(t):
        raise ValueError(f"p and t must pair up, got {len(p)} predictions and {len(t)} targets")
    total = None
    for pi, ti in zip(p, t):
        if pi.dim() != 2 or pi.shape != ti.shape:
            raise ValueError(f"p and t must be (B, k) of the same shape, got {tuple(pi.shape)} and "
                             f"{tuple(ti.shape)}")
        term = -2.0 * (pi.float() * ti.detach().float()).sum(1).mean()
        total = term if total is None else total + term
    return total


def _supports(cls, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def _plain(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


class Trainer:
    """Builds everything from a config namespace (see :mod:`.cli`) and runs it."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._init_distributed()
        self.is_main = self.rank == 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._build_data()
        self._build_model()
        self._build_optim()
        self.start_epoch, self.step, self.history = 0, 0, []
        self.ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
        if cfg.resume:
            self.load_checkpoint(cfg.resume)

    # ------------------------------------------------------------------ setup
    def _init_distributed(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = self.cfg.device in ("cuda", "auto") and torch.cuda.is_available()
        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA device is available")
        self.device = torch.device(f"cuda:{local}" if want_cuda else "cpu")
        if want_cuda:
            torch.cuda.set_device(self.device)
        self.distributed = self.world > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        if self.cfg.batch_size % self.world:
            raise ValueError(f"--batch-size {self.cfg.batch_size} must be divisible by the number "
                             f"of processes ({self.world})")
        self.local_batch = self.cfg.batch_size // self.world
        self.cuda = self.device.type == "cuda"

    def _build_data(self):
        cfg = self.cfg
        self.stream = None
        if cfg.dataset == "fashion-mnist":
            train, test = D.load_fashion_mnist(cfg.data_dir, download=cfg.download)
            cfg.image_size = cfg.image_size or 28
            self.channels = 1
        elif cfg.dataset == "folder":
            if not cfg.data_dir:
                raise ValueError("--data-dir is required with --dataset folder")
            tr_dir, ev_dir = D.split_folder(cfg.data_dir)
            cfg.image_size = cfg.image_size or 224
            self.channels = 1 if cfg.grayscale else 3
            if cfg.loader == "memory":
                train = D.load_folder_tensor(tr_dir, cfg.image_size, self.channels)
                test = (D.load_folder_tensor(ev_dir, cfg.image_size, self.channels) if ev_dir
                        else None)
                if test is None:
                    train, test = D.holdout_split(train, cfg.holdout, cfg.seed)
            else:
                mean, std = D.IMAGENET_MEAN, D.IMAGENET_STD
                v1, v2 = D.view_configs(cfg.augment, cfg.image_size, 3)
                tf = D.TwoViews(D.pil_view_transform(v1, cfg.image_size, mean, std),
                                D.pil_view_transform(v2, cfg.image_size, mean, std))
                ev_tf = D.pil_eval_transform(cfg.image_size, mean, std)
                self.stream = {"train": D.folder_stream(tr_dir, tf),
                               "train_eval": D.folder_stream(tr_dir, ev_tf),
                               "eval": D.folder_stream(ev_dir, ev_tf) if ev_dir else None}
                if self.stream["eval"] is None:
                    n = len(self.stream["train_eval"])
                    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
                    n_out = max(1, int(round(n * cfg.holdout)))
                    self.stream["eval"] = torch.utils.data.Subset(self.stream["train_eval"], perm[:n_out])
                    keep = perm[n_out:]
                    self.stream["train"] = torch.utils.data.Subset(self.stream["train"], keep)
                    self.stream["train_eval"] = torch.utils.data.Subset(self.stream["train_eval"], keep)
                self.num_classes = len(self.stream["train_eval"].dataset.classes
                                       if isinstance(self.stream["train_eval"], torch.utils.data.Subset)
                                       else self.stream["train_eval"].classes)
                self.train_len = len(self.stream["train"])
                train = test = None
        else:
            raise ValueError(f"--dataset must be 'fashion-mnist' or 'folder', got {cfg.dataset!r}")
        if self.stream is None:
            self.train_ds, self.eval_ds = train, test
            self.train_len = len(train)
            self.num_classes = int(max(train.labels.max(), test.labels.max())) + 1
            v1, v2 = D.view_configs(cfg.augment, cfg.image_size, self.channels)
            self.augs = (D.BatchAugment(v1, cfg.image_size, train.mean, train.std),
                         D.BatchAugment(v2, cfg.image_size, train.mean, train.std))
        epoch_size = min(cfg.epoch_size or self.train_len, self.train_len)
        self.steps_per_epoch = epoch_size // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the images per epoch "
                             f"({epoch_size})")
        self.total_steps = self.steps_per_epoch * cfg.epochs

    def _build_model(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        backbone, feat_dim = build_backbone(cfg.arch, self.channels, cfg.stem, cfg.image_size,
                                            cfg.width, cfg.pool)
        self.feat_dim = feat_dim
        # The randomly initialised backbone: the baseline of the final report.
        self.init_backbone_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim, cfg.proj_layers,
                        last_bn=cfg.method == "mio")
        predictor = (mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, 2) if cfg.method == "minc" else None)
        model = SSLModel(backbone, projector, predictor)
        if self.distributed and cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if self.cuda:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.target = MomentumEncoder(model.encoder) if cfg.method == "minc" else None
        # Under DDP the losses see the global batch (gather_distributed, SPEC §5) when the
        # installed minc_kernels supports it.
        gather = {"gather_distributed": True} if self.distributed else {}
        if cfg.method == "minc":
            kw = {k: v for k, v in gather.items() if _supports(MINCLoss, k)}
            ordering = getattr(cfg, "ordering", "standard") or "standard"
            self.loss_fn = MINCLoss(cfg.proj_dim, moment_momentum=cfg.moment_momentum,
                                    ordering=ordering, backend=cfg.backend, **kw)
        elif cfg.method == "spectral":
            kw = {k: v for k, v in gather.items() if _supports(SpectralContrastiveLoss, k)}
            self.loss_fn = SpectralContrastiveLoss(mu=cfg.mu, backend=cfg.backend, **kw)
        elif cfg.method == "mio":
            kw = {k: v for k, v in gather.items() if _supports(MIOLoss, k)}
            self.loss_fn = MIOLoss(backend=cfg.backend, **kw)
        else:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
        self.loss_fn.to(self.device)
        self.ddp_model = (nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.cuda else None) if self.distributed else model)

    def _build_optim(self):
        cfg = self.cfg
        if cfg.lr_scaling not in ("linear", "sqrt", "none"):
            raise ValueError(f"--lr-scaling must be 'linear', 'sqrt' or 'none', got {cfg.lr_scaling!r}")
        scale = {"linear": cfg.batch_size / 256, "sqrt": math.sqrt(cfg.batch_size / 256),
                 "none": 1.0}[cfg.lr_scaling]
        self.base_lr = cfg.lr * scale
        self.optimizer = build_optimizer(cfg.optimizer, self.model, self.base_lr, cfg.weight_decay,
                                         cfg.momentum, cfg.lars_eta)
        if cfg.amp == "auto":
            cfg.amp = "bf16" if self.cuda else "none"
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ data iteration
    def _batches(self, epoch: int):
        """Yields (x1, x2) views of this rank for one epoch, reproducible from (seed, epoch)."""
        cfg = self.cfg
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, self.rank))
        g = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
        if self.stream is None:
            perm = torch.randperm(self.train_len, generator=g)
            ga = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, self.rank + 1))
            lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
            for s in range(self.steps_per_epoch):
                idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size][lo:hi]
                x = self.train_ds.images[idx]
                yield self.augs[0](x, ga, self.device), self.augs[1](x, ga, self.device)
            return
        ds = self.stream["train"]
        if self.distributed:
            sampler = torch.utils.data.DistributedSampler(ds, self.world, self.rank, shuffle=True,
                                                          seed=cfg.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = torch.utils.data.RandomSampler(ds, generator=g)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.local_batch, sampler=sampler, num_workers=cfg.workers,
            pin_memory=self.cuda, drop_last=True, generator=g,
            persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
        for s, ((x1, x2), _) in enumerate(loader):
            if s >= self.steps_per_epoch:
                break
            yield x1.to(self.device, non_blocking=True), x2.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ training
    def train_step(self, x1, x2) -> torch.Tensor:
        cfg = self.cfg
        lr = warmup_cosine(self.step, self.total_steps, self.warmup_steps, self.base_lr,
                           self.base_lr * cfg.final_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cuda:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            z1, p1 = self.ddp_model(x1)
            z2, p2 = self.ddp_model(x2)
            if self.target is not None:
                t1, t2 = self.target(x1), self.target(x2)
        if cfg.method == "minc":
            t1, t2 = t1.to(p1.dtype), t2.to(p1.dtype)
            if cfg.normalize:  # BYOL-style: compare directions (unit-norm p and t)
                p1, p2, t1, t2 = (nn.functional.normalize(v, dim=1) for v in (p1, p2, t1, t2))
            if getattr(cfg, "minc_ablation", "none") == "no-moment":
                # the cross-correlation term alone (no p^T M p): what MINC is without the
                # summary of the other samples; M is neither used nor updated
                loss = minc_no_moment_loss((p1, p2), (t2.detach(), t1.detach()))
            else:
                loss = self.loss_fn((p1, p2), (t2, t1))
        else:
            loss = self.loss_fn(z1, z2)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.target is not None:
            self.momentum_now = cosine_momentum(self.step, self.total_steps, cfg.ema_base)
            ema_step(self.target, self.momentum_now, cfg.ema_backend, check_finite=not self.cuda)
        self.last_lr = lr
        self.step += 1
        return loss.detach()

    def train_epoch(self, epoch: int) -> dict:
        from tqdm import tqdm
        self.ddp_model.train()
        self.loss_fn.train()
        self.momentum_now = float("nan")
        total, n, t0 = torch.zeros((), device=self.device), 0, time.time()
        bar = tqdm(self._batches(epoch), total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                   disable=not self.is_main or not self.cfg.progress, leave=False, dynamic_ncols=True)
        for x1, x2 in bar:
            loss = self.train_step(x1, x2)
            total += loss
            n += 1
            if n % self.cfg.log_every == 0 or n == self.steps_per_epoch:
                val = float(loss)
                if not math.isfinite(val):
                    raise FloatingPointError(f"the loss became {val} at step {self.step}; lower --lr "
                                             "or check the data")
                bar.set_postfix(loss=f"{val:.4f}", lr=f"{self.last_lr:.3g}")
        dt = time.time() - t0
        return {"loss": float(total) / max(n, 1), "lr": self.last_lr, "ema_momentum": self.momentum_now,
                "epoch_time_s": dt, "step_time_s": dt / max(n, 1)}

    # ------------------------------------------------------------------ features / evaluation
    @torch.no_grad()
    def features(self, net: nn.Module, which: str, limit: int = 0, raw: bool = False):
        """(features, labels) of ``which`` in {"train", "eval"} (no augmentation), first
        ``limit`` items of a fixed permutation; ``raw`` returns flattened normalised pixels."""
        was = net.training if net is not None else False
        if net is not None:
            net.eval()
        feats, labels = [], []
        bs = self.cfg.eval_batch_size
        if self.stream is None:
            ds = self.train_ds if which == "train" else self.eval_ds
            ds = ds.subset(limit, seed=self.cfg.seed + (0 if which == "train" else 1))
            for s in range(0, len(ds), bs):
                x = ds.normalize(ds.images[s:s + bs], self.device)
                if raw:
                    feats.append(x.flatten(1).cpu())
                else:
                    if self.cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with self.autocast():
                        feats.append(net(x).float().flatten(1).cpu())
                labels.append(ds.labels[s:s + bs])
        else:
            ds = self.stream["train_eval" if which == "train" else "eval"]
            if limit and limit < len(ds):
                idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.cfg.seed)).tolist()
                ds = torch.utils.data.Subset(ds, idx[:limit])
            loader = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=self.cfg.workers,
                                                 pin_memory=self.cuda)
            for x, y in loader:
                x = x.to(self.device, non_blocking=True)
                if raw:
                    feats.append(x.flatten(1).cpu())
                else:
                    if self.cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with self.autocast():
                        feats.append(net(x).float().flatten(1).cpu())
                labels.append(y)
        if net is not None:
            net.train(was)
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """kNN accuracy (%) and effective rank of backbone features on held-out data."""
        cfg = self.cfg
        bb = self.model.backbone
        ftr, ytr = self.features(bb, "train", cfg.knn_bank)
        fte, yte = self.features(bb, "eval", cfg.knn_queries)
        acc = knn_accuracy(ftr, ytr, fte, yte, k=cfg.knn_k, num_classes=self.num_classes)
        proj = self.features(self.model.encoder, "eval", cfg.knn_queries)[0]
        return {"knn_acc": acc, "eff_rank": effective_rank(fte), "proj_eff_rank": effective_rank(proj)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(),
                "target": self.target.state_dict() if self.target is not None else {},
                "loss": self.loss_fn.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": epoch, "step": self.step,
                "rng": rng_state(),
                "history": self.history,
                "config": {k: _plain(v) for k, v in vars(self.cfg).items()}}

    def save_checkpoint(self, epoch: int) -> None:
        if self.is_main:
            atomic_save(self.state_dict(epoch), self.ckpt_path)

    def load_checkpoint(self, path: str) -> None:
        if os.path.isdir(path):
            path = os.path.join(path, "checkpoint.pt")
        if not os.path.isfile(path):
            raise ValueError(f"--resume {path!r}: no such checkpoint file")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ck["model"])
        if self.target is not None:
            self.target.load_state_dict(ck["target"])
        self.loss_fn.load_state_dict(ck["loss"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.start_epoch, self.step = int(ck["epoch"]) + 1, int(ck["step"])
        self.history = list(ck.get("history", []))
        set_rng_state(ck["rng"])

    # ------------------------------------------------------------------ main loop
    def fit(self) -> list[dict]:
        cfg = self.cfg
        logger = CSVLogger(os.path.join(cfg.out_dir, "log.csv"), LOG_FIELDS) if self.is_main else None
        t_start = time.time() - (self.history[-1]["elapsed_s"] if self.history else 0.0)
        cpu0 = (self.history[-1].get("cpu_time_s", 0.0) if self.history else 0.0) - time.process_time()
        end = cfg.epochs
        if cfg.stop_after:
            end = min(end, self.start_epoch + cfg.stop_after)
        for epoch in range(self.start_epoch, end):
            row = {"epoch": epoch + 1}
            row.update(self.train_epoch(epoch))
            row["step"] = self.step
            if self.is_main and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                row.update(self.evaluate())
            row["elapsed_s"] = time.time() - t_start
            # process CPU seconds (all threads) since the start: on a machine shared with other
            # jobs, cpu_time / threads estimates the wall time the run would take on idle cores
            row["cpu_time_s"] = cpu0 + time.process_time()
            row = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}
            self.history.append(row)
            if self.is_main:
                logger.log(row)
                if self.tb is not None:
                    for k, v in row.items():
                        if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(v):
                            self.tb.add_scalar(k, v, epoch + 1)
                msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                print(msg, flush=True)
            self.save_checkpoint(epoch)
            if self.distributed:
                dist.barrier()
        return self.history

    tb = None

    # ------------------------------------------------------------------ final report
    @torch.no_grad()
    def final_report(self) -> dict:
        """Linear probes (L-BFGS logistic regression on standardised features, train → held-out)
        of the trained backbone, the same backbone at its random initialisation, and raw pixels."""
        cfg = self.cfg
        out = {}
        lim_tr, lim_te = cfg.probe_train_limit, cfg.probe_eval_limit
        ftr, ytr = self.features(self.model.backbone, "train", lim_tr)
        fte, yte = self.features(self.model.backbone, "eval", lim_te)
        out["ssl"] = linear_probe(ftr, ytr, fte, yte, max_iter=cfg.probe_iters, num_classes=self.num_classes)
        out["ssl"]["dim"] = ftr.shape[1]
        out["ssl"]["eff_rank"] = effective_rank(fte)
        rand = copy.deepcopy(self.model.backbone)
        rand.load_state_dict(self.init_backbone_state)
        ftr, _ = self.features(rand, "train", lim_tr)
        fte, _ = self.features(rand, "eval", lim_te)
        out["random_init"] = linear_probe(ftr, ytr, fte, yte, max_iter=cfg.probe_iters,
                                          num_classes=self.num_classes)
        out["random_init"]["dim"] = ftr.shape[1]
        out["random_init"]["eff_rank"] = effective_rank(fte)
        del rand, ftr, fte
        if self.stream is None or cfg.raw_probe:
            rtr, _ = self.features(None, "train", lim_tr, raw=True) if self.stream is None else \
                self._raw_stream("train", lim_tr)
            rte, _ = self.features(None, "eval", lim_te, raw=True) if self.stream is None else \
                self._raw_stream("eval", lim_te)
            out["raw_pixels"] = linear_probe(rtr, ytr, rte, yte, max_iter=cfg.probe_iters,
                                             num_classes=self.num_classes)
            out["raw_pixels"]["dim"] = rtr.shape[1]
        return out

    def _raw_stream(self, which, limit):
        return self.features(nn.Identity(), which, limit)
