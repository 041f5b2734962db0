"""The training loop: setup (data, model, loss, optimiser, DDP), epochs, evaluation,
atomic verified checkpoints (:mod:`.checkpoint`) with exact resume, and the final
linear-probe report."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as C
from . import data as D
from . import methods as M
from .cpu import ThreadTuner, default_threads, native_bf16
from .metrics import CSVLogger, effective_rank, knn_accuracy, linear_probe
from .models import build_backbone
from .optim import build_optimizer, warmup_cosine

LOG_FIELDS = ["epoch", "step", "loss", "lr", "ema_momentum", "knn_acc", "eff_rank", "proj_eff_rank",
              "epoch_time_s", "step_time_s", "elapsed_s", "cpu_time_s", "threads"]


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
    """Write the checkpoint ``obj`` with its digest, atomically (:func:`.checkpoint.save`)."""
    C.save(obj, path)


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Under torchrun (``WORLD_SIZE`` > 1) initialise the process group once (nccl on GPU,
    gloo on CPU).  Returns (rank, world size, this process's device).  ``device``: auto,
    cpu or cuda."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    want_cuda = device in ("cuda", "auto") and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, dev


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
        # --threads 0 on the CPU: the thread count is chosen by timing the steps (ThreadTuner),
        # since on a shared machine 2 threads meeting at barriers can be slower than 1
        self.thread_tuner = None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif self.device.type == "cpu" and not self.distributed:
            self.thread_tuner = ThreadTuner(min(torch.get_num_threads(), default_threads()))
        self._build_data()
        self._build_model()
        self._build_optim()
        self.start_epoch, self.step, self.history = 0, 0, []
        self.resumed_config = None  # the checkpoint's config after load_checkpoint
        self.resumed_verified = None  # whether its digest was checked (False: an older file)
        self.ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
        if cfg.resume:
            self.load_checkpoint(cfg.resume)

    # ------------------------------------------------------------------ setup
    def _init_distributed(self):
        # a no-op when the caller (cli.run) has initialised the process group already
        self.rank, self.world, self.device = init_distributed(self.cfg.device)
        self.distributed = self.world > 1
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
        model = M.build_model(cfg.method, backbone, feat_dim, cfg.proj_hidden, cfg.proj_dim,
                              cfg.proj_layers, cfg.pred_hidden)
        if self.distributed and cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        # channels_last on the CPU too: oneDNN's convolutions then skip the NCHW <-> blocked
        # layout copies (measured 1.25x per training step of the default conv net)
        model.to(memory_format=torch.channels_last)
        self.model = model
        self.target = M.build_target(cfg.method, model)
        self.loss_fn = M.build_loss(cfg.method, cfg.proj_dim, backend=cfg.backend, mu=cfg.mu,
                                    moment_momentum=cfg.moment_momentum, ordering=cfg.ordering,
                                    gather_distributed=self.distributed)
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
            # bf16 where the hardware has it: the GPU, and CPUs with bf16 dot products
            # (AVX512-BF16/AMX: 2x per step of the default run; elsewhere bf16 is emulated)
            cfg.amp = "bf16" if self.cuda or (self.device.type == "cpu" and native_bf16()) else "none"
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def set_schedule(self, total_steps: int, warmup_steps: int) -> None:
        """Run the lr and EMA schedules over ``total_steps`` steps (``warmup_steps`` of them
        linear lr warm-up), for callers that drive :meth:`train_step` themselves."""
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                             f"{total_steps} and {warmup_steps}")
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)

    def train_mode(self) -> None:
        """Online network and loss in training mode (BN batch statistics, MINC's M updated)."""
        self.ddp_model.train()
        self.loss_fn.train()

    # ------------------------------------------------------------------ data iteration
    def two_views(self, x: torch.Tensor, generator: torch.Generator):
        """The two augmented views of a batch ``x`` of in-memory training images (memory
        loader only), drawn with ``generator``."""
        if self.stream is not None:
            raise ValueError("two_views needs the in-memory loader (--loader memory)")
        return self.augs[0](x, generator, self.device), self.augs[1](x, generator, self.device)

    def batches(self, epoch: int):
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
                yield self.two_views(x, ga)
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
        x1 = x1.contiguous(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = M.forward_views(self.ddp_model, self.target, x1, x2)
        loss = M.compute_loss(cfg.method, self.loss_fn, out, cfg.normalize, cfg.minc_ablation)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # check_finite on the CPU only: on the GPU it would wait on the device every step
        self.momentum_now = M.update_target(self.target, self.step, self.total_steps, cfg.ema_base,
                                            backend=cfg.ema_backend, check_finite=not self.cuda)
        self.last_lr = lr
        self.step += 1
        return loss.detach()

    def train_epoch(self, epoch: int) -> dict:
        from tqdm import tqdm
        self.train_mode()
        self.momentum_now = float("nan")
        total, n, t0 = torch.zeros((), device=self.device), 0, time.time()
        bar = tqdm(self.batches(epoch), total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                   disable=not self.is_main or not self.cfg.progress, leave=False, dynamic_ncols=True)
        tuner = self.thread_tuner
        for x1, x2 in bar:
            if tuner is not None:
                tuner.before_step()
            loss = self.train_step(x1, x2)
            if tuner is not None:
                tuner.after_step()
            total += loss
            n += 1
            if n % self.cfg.log_every == 0 or n == self.steps_per_epoch:
                val = float(loss)
                if not math.isfinite(val):
                    raise FloatingPointError(f"the loss became {val} at step {self.step}; lower --lr "
                                             "or check the data")
                bar.set_postfix(loss=f"{val:.4f}", lr=f"{self.last_lr:.3g}")
        dt = time.time() - t0
        row = {"loss": float(total) / max(n, 1), "lr": self.last_lr,
               "epoch_time_s": dt, "step_time_s": dt / max(n, 1),
               "threads": tuner.settle() if tuner is not None else torch.get_num_threads()}
        if self.target is not None:  # methods without an EMA target have no momentum to log
            row["ema_momentum"] = self.momentum_now
        skipped = self.unreadable_images()
        if skipped:  # each one was named on stderr when met
            row["unreadable_images_skipped"] = skipped
        return row

    def unreadable_images(self) -> int:
        """Unreadable images this process's stream loader has skipped so far (0 for the
        in-memory loader, which drops them once at load time)."""
        if self.stream is None:
            return 0
        seen = {}
        for ds in self.stream.values():
            while isinstance(ds, torch.utils.data.Subset):
                ds = ds.dataset
            if isinstance(ds, D.SkipUnreadable):
                seen[id(ds)] = ds.skipped
        return sum(seen.values())

    # ------------------------------------------------------------------ features / evaluation
    @torch.no_grad()
    def features(self, net: nn.Module, which: str, limit: int = 0, raw: bool = False):
        """(features, labels) of ``which`` in {"train", "eval"} (no augmentation), first
        ``limit`` items of a fixed permutation; ``raw`` returns flattened normalised pixels."""
        was = net.training if net is not None else False
        if net is not None:
            net.eval()

        def embed(x):  # one normalised batch on the device -> its (B, features) rows on the CPU
            if raw:
                return x.flatten(1).cpu()
            x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                return net(x).float().flatten(1).cpu()

        feats, labels = [], []
        bs = self.cfg.eval_batch_size
        if self.stream is None:
            ds = self.train_ds if which == "train" else self.eval_ds
            ds = ds.subset(limit, seed=self.cfg.seed + (0 if which == "train" else 1))
            for s in range(0, len(ds), bs):
                feats.append(embed(ds.normalize(ds.images[s:s + bs], self.device)))
                labels.append(ds.labels[s:s + bs])
        else:
            ds = self.stream["train_eval" if which == "train" else "eval"]
            if limit and limit < len(ds):
                idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.cfg.seed)).tolist()
                ds = torch.utils.data.Subset(ds, idx[:limit])
            loader = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=self.cfg.workers,
                                                 pin_memory=self.cuda)
            for x, y in loader:
                feats.append(embed(x.to(self.device, non_blocking=True)))
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
        """Restore everything from the checkpoint ``path`` (a file or a run folder), verified
        by :func:`.checkpoint.read`; a checkpoint that does not fit this model, optimiser or
        loss is a :class:`.checkpoint.CheckpointError` naming the file and the part."""
        if os.path.isdir(path):
            path = os.path.join(path, "checkpoint.pt")
        ck = C.read(path)
        parts = [("model", self.model), ("target", self.target), ("loss", self.loss_fn),
                 ("optimizer", self.optimizer)]
        if ck.get("scaler"):
            parts.append(("scaler", self.scaler))
        for name, obj in parts:
            if obj is None:
                continue
            try:
                obj.load_state_dict(ck[name])
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
                raise C.CheckpointError(
                    f"checkpoint {path}: its {name} state does not fit this run "
                    f"({C._first_line(exc, 200)}); resume it with the options it was written with, "
                    "or start a new run") from None
        try:
            set_rng_state(ck["rng"])
            history = [dict(r) for r in ck.get("history", [])]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise C.CheckpointError(f"checkpoint {path}: its RNG state or history is not readable "
                                    f"({C._first_line(exc)})") from None
        self.start_epoch, self.step = int(ck["epoch"]) + 1, int(ck["step"])
        self.history = history
        self.resumed_config = dict(ck.get("config", {}))
        self.resumed_verified = bool(ck.get("verified"))

    # ------------------------------------------------------------------ main loop
    def fit(self) -> list[dict]:
        cfg = self.cfg
        logger = None
        if self.is_main:
            # the log holds exactly the checkpoint's epochs: rows of an epoch that was logged but
            # never checkpointed (a run killed in between) are dropped, not repeated
            logger = CSVLogger(os.path.join(cfg.out_dir, "log.csv"), LOG_FIELDS)
            logger.rewrite(self.history)
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
