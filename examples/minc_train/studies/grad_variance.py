"""Study 1 (issue 8): gradient variance and signal-to-noise ratio vs batch size.

``python -m minc_train.studies.grad_variance [--budget cpu|gpu] [--device auto|cpu|cuda]``

The MINC paper claims that comparing each sample with a summary ``M`` of the others, instead
of with every other sample, lowers the variance of the training signal.  This measures it.

**One fixed network state.**  The CPU preset's conv net (backbone + projector + predictor,
``minc_train``) is warmed up with MINC on Fashion-MNIST for ``--warmup-steps`` steps
(``Trainer.train_step``: AdamW, EMA target, MINC's EMA moment ``M``).  Every method is then
measured on that *same* online network: spectral and MIO on the projections ``z`` of the two
views, MINC on the predictions ``p`` against the EMA target's projections ``t`` (symmetric,
as in training).  Nothing is updated while measuring: no optimiser step, no EMA step, the
MINC loss in eval mode (its ``M`` held fixed), BatchNorm momentum set to 0.

**Methods.**  ``spectral`` (:class:`minc_kernels.SpectralContrastiveLoss`, mu=1);
``minc_ema`` (:class:`minc_kernels.MINCLoss` with the warmed-up EMA ``M``, held fixed);
``minc_batch`` (``MINCLoss(moment_momentum=0)`` in training mode: ``M = C``, the moment of
*this* batch's targets); ``mio`` (:class:`minc_kernels.MIOLoss`, tau=0.5, lambda=1).
Backend ``auto``.

These four are different objectives: their expected gradients differ, and the state (trained
with MINC) sits nearer a stationary point of some of them than of others, which moves the
SNR through the signal, not the noise.  So a *controlled pair* is measured as well, one
objective with two estimators of it: ``spectral_noclip`` (the spectral loss without norm
clipping: the pairwise U-statistic, docs/math.md §1) and ``spectral_moment`` (the same population
objective with its pairwise term replaced by ``zᵀ M z``, M = E[z zᵀ] of the projections held
fixed, estimated once from an independent batch of ``--ref-batch`` images: a
``MINCLoss((z1, z2), (z2, z1))`` in eval mode with that M, no predictor, no target network).
By docs/math.md §2 the two have the same expected gradient, ``(2/B)(M z1_i − z2_i)`` per row; they
differ only in comparing each sample with every other one vs with the summary M, which is
the paper's claim in isolation.

**BatchNorm.**  Measured in *training* mode, i.e. with batch statistics, because that is the
gradient training actually applies.  Consequence: even for MINC with a fixed ``M`` the batch
gradient is not exactly a mean of per-sample gradients (BN couples the samples), so
``variance x b`` need not be exactly flat for any method.

**Gradients.**  The gradient of the loss w.r.t. every parameter of the online *encoder*
(backbone + projector: the parameters all four losses train), flattened.  For the MINC
methods the JSON also holds the numbers over encoder + predictor (``with_predictor``).

**Estimator** (:class:`DeviationGram`, :func:`noise_stats`, :func:`gradient_noise`).  For each
batch size b, n independent mini-batches (fresh images drawn without replacement from the
60k training images, fresh augmentations of both views) give gradients ``g_1..g_n``; K
(default 2) independent large batches of ``--ref-batch`` images give ``r_1..r_K``.  ḡ is
the mean of the ``r_k``.  For the pairwise / nonlinear losses the large-batch gradient is
*not* the mean of small-batch gradients, which is why ḡ comes from large batches and not
from the ``g_i``.  Reported, per method and b:

* ``total_variance`` = E||g_b - μ||², μ = E[r] (the large-batch gradient):
  mean_i ||g_i - ḡ||² minus the noise of ḡ itself, estimated from the spread of the ``r_k``
  (an unbiased correction: ``E||g - ḡ||² = E||g - μ||² + E||ḡ - μ||²``).
* ``sample_variance`` = tr Cov(g_b): the unbiased sample variance around the mean of the
  ``g_i`` (does not use ḡ).
* ``bias_sq`` = ||E g_b - μ||², unbiased: ||mean g - ḡ||² - sample_variance/n - noise(ḡ).
  ``total_variance = sample_variance + bias_sq`` holds exactly for the estimates.
* ``signal`` = ||μ||², unbiased: the mean of ``<r_k, r_l>`` over k != l.
* ``snr`` = signal / total_variance.
* Standard errors: delete-one jackknife over the n draws (the ḡ / signal estimates are
  held fixed; their own uncertainty, common to every b of a method, is reported separately
  as ``signal_se_bound``).  ``paired_ratios`` holds SNR and variance ratios of the pairs in
  ``PAIRS`` with a *paired* jackknife (the methods share the mini-batches), so its SE is the
  one to use for "is this method's SNR higher than that one's at this b".
* ``flatness``: per method, the exponent α of a weighted fit total_variance ∝ b^α (α = -1:
  like a per-sample mean; α < -1: extra 1/b² terms) and the ratio of variance·b at the
  smallest b to that at the largest b, with SEs (the b's use independent draws).

Losses have different scales, so ``variance`` levels are not comparable across methods:
compare SNR across methods, and the slope of ``variance x b`` within a method (flat: a
per-sample mean, as 1/b; falling with b: extra 1/b² terms from pairwise comparisons).

Writes ``results.json``, ``table.md``, ``variance_times_b.png`` and ``snr.png`` under
``--out``.  ``--budget cpu`` (default) takes about 14 min of CPU time on one thread;
``--budget gpu`` is sized for one GPU (not run here: no GPU was available to this work);
``--quick`` is a seconds-long smoke run for tests.  ``--from-json`` re-draws the table and
plots from a results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

import torch

from minc_train import methods as M
from minc_train.plots import pyplot, save_figure
from minc_train.studies._common import RESULTS, ROOT, write_json

DEFAULT_OUT = os.path.join(RESULTS, "grad_variance")
METHODS = ("spectral", "minc_ema", "minc_batch", "mio", "spectral_noclip", "spectral_moment")
LABELS = {"spectral": "spectral contrastive", "minc_ema": "MINC, EMA M (fixed)",
          "minc_batch": "MINC, batch M (β=0)", "mio": "MIO",
          "spectral_noclip": "spectral, no clip (pairwise)",
          "spectral_moment": "spectral objective via fixed M (no pairs)"}
STYLE = {"spectral": ("tab:blue", "o", "-"), "minc_ema": ("tab:red", "s", "-"),
         "minc_batch": ("tab:orange", "^", "-"), "mio": ("tab:green", "D", "-"),
         "spectral_noclip": ("tab:purple", "v", "--"), "spectral_moment": ("tab:brown", "P", "--")}
# (method, baseline) pairs whose SNR / variance ratios get a paired jackknife SE
PAIRS = (("minc_ema", "spectral"), ("minc_batch", "spectral"), ("mio", "spectral"),
         ("spectral_moment", "spectral_noclip"))

# Draws per batch size: fewer at large b (each costs ~b).  Measured for the default cpu budget
# (all six methods: one shared forward, six backward passes per draw), one thread: 844 s of
# CPU time (14.1 min; 21.8 min wall on 2 cores shared with other jobs): warm-up 150 x 256,
# M from one batch of 4096, 2 x 4096 reference images, 39,936 images of draws.
BUDGETS = {
    "cpu": dict(batch_sizes="32,64,128,256,512,1024", draws="64,64,48,32,18,10", ref_batch=4096,
                warmup_steps=150, warmup_batch=256, train_args=[]),
    "gpu": dict(batch_sizes="32,64,128,256,512,1024", draws="400,400,300,250,200,150",
                ref_batch=16384, warmup_steps=1000, warmup_batch=256, train_args=[]),
    # smoke test: a tiny network and a few draws on whatever data is given
    "quick": dict(batch_sizes="4,8", draws="4", ref_batch=16, warmup_steps=2, warmup_batch=8,
                  train_args=["--width", "4", "--pool", "1", "--proj-hidden", "16", "--proj-dim", "8",
                              "--pred-hidden", "16"]),
}


# ============================================================================ the estimator
class DeviationGram:
    """Collects gradients ``g_i`` as deviations ``g_i - ḡ`` from the mean ḡ of the reference
    gradients, and returns their Gram matrix (float64) for :func:`noise_stats`.

    Args:
        ref_grads: one 1-D tensor (ḡ taken as exact) or a sequence of K >= 2 independent
            large-batch gradients (ḡ = their mean; its noise is estimated and removed).
    """

    def __init__(self, ref_grads):
        refs = [ref_grads] if isinstance(ref_grads, torch.Tensor) else list(ref_grads)
        if not refs:
            raise ValueError("ref_grads must be a 1-D tensor or a non-empty sequence of them")
        for i, r in enumerate(refs):
            if not isinstance(r, torch.Tensor) or r.dim() != 1 or not r.is_floating_point():
                raise ValueError(f"ref_grads[{i}] must be a 1-D floating tensor, got "
                                 f"{type(r).__name__ if not isinstance(r, torch.Tensor) else tuple(r.shape)}")
            if r.shape != refs[0].shape:
                raise ValueError(f"ref_grads[{i}] has shape {tuple(r.shape)}, "
                                 f"expected {tuple(refs[0].shape)}")
        r64 = torch.stack([r.detach().double() for r in refs])
        self.ref_gram = r64 @ r64.T
        self.center = r64.mean(0).to(refs[0].dtype)
        self.rows: list[torch.Tensor] = []

    def add(self, g: torch.Tensor) -> None:
        """Store one draw's gradient (1-D, same size as the references)."""
        if not isinstance(g, torch.Tensor) or g.shape != self.center.shape:
            raise ValueError(f"g must be a 1-D tensor of shape {tuple(self.center.shape)}, got "
                             f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
        self.rows.append((g.detach().to(self.center.dtype) - self.center.to(g.device)).to(self.center.device))

    def __len__(self) -> int:
        return len(self.rows)

    def gram(self, chunk: int = 1 << 18) -> torch.Tensor:
        """(n, n) float64 Gram matrix of the deviations, accumulated in column chunks."""
        n = len(self.rows)
        out = torch.zeros(n, n, dtype=torch.float64)
        if n == 0:
            return out
        size = self.rows[0].numel()
        for s in range(0, size, chunk):
            blk = torch.stack([r[s:s + chunk] for r in self.rows]).double()
            out += (blk @ blk.T).cpu()
        return out


def _jackknife_se(loo: torch.Tensor) -> float:
    n = loo.numel()
    return float(torch.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))


def noise_stats(gram: torch.Tensor, ref_gram: torch.Tensor, batch_size: int | None = None) -> dict:
    """Gradient-noise statistics from the Gram matrix of deviations ``d_i = g_i - ḡ``.

    ``gram``: (n, n), n >= 3, ``<d_i, d_j>``; ``ref_gram``: (K, K) Gram of the reference
    gradients whose mean is ḡ.  Returns ``total_variance`` (E||g - μ||²), ``sample_variance``
    (tr Cov g), ``bias_sq`` (||E g - μ||²), ``signal`` (||μ||²), ``snr``, their jackknife
    standard errors (``*_se``), ``ref_noise`` (the estimate of E||ḡ - μ||² that was removed;
    0 for K = 1) and ``*_times_b`` when ``batch_size`` is given.  The leave-one-out values
    are under ``"_loo"`` (for paired comparisons); see the module docstring.
    """
    gram = torch.as_tensor(gram, dtype=torch.float64)
    ref_gram = torch.as_tensor(ref_gram, dtype=torch.float64)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 3:
        raise ValueError(f"gram must be a square (n, n) matrix with n >= 3 draws, got {tuple(gram.shape)}")
    if ref_gram.dim() != 2 or ref_gram.shape[0] != ref_gram.shape[1] or ref_gram.shape[0] < 1:
        raise ValueError(f"ref_gram must be a square (K, K) matrix, K >= 1, got {tuple(ref_gram.shape)}")
    n, k = gram.shape[0], ref_gram.shape[0]
    if k >= 2:
        spread = float(torch.trace(ref_gram) - ref_gram.sum() / k)  # Σ_k ||r_k - ḡ||²
        ref_noise = spread / (k - 1) / k  # (sample variance of one r) / K = Var(ḡ)
        signal = float((ref_gram.sum() - torch.trace(ref_gram)) / (k * (k - 1)))
        per_ref_var = spread / (k - 1)
        # SD of <r_k, r_l> <= sqrt(2 ||μ||² v + v²) with v = tr Cov(r) (Cauchy-Schwarz bounds
        # on μᵀΣμ and tr Σ²); divided by the number of independent pairs' worth, K/2
        signal_se_bound = math.sqrt(max(2 * max(signal, 0.0) * per_ref_var + per_ref_var ** 2, 0.0)
                                    / max(k // 2, 1))
    else:
        ref_noise, signal, signal_se_bound = 0.0, float(ref_gram[0, 0]), float("nan")
    a = torch.diagonal(gram)
    rows = gram.sum(1)
    total = gram.sum()
    sum_a = a.sum()

    def stats(sum_diag, tot, m):
        mse = sum_diag / m - ref_noise
        var = (sum_diag - tot / m) / (m - 1)
        bias = tot / (m * m) - var / m - ref_noise
        return mse, var, bias

    mse, var, bias = (float(v) for v in stats(sum_a, total, n))
    mse_l, var_l, bias_l = stats(sum_a - a, total - 2 * rows + a, n - 1)
    snr = signal / mse if mse > 0 else float("inf")
    snr_l = signal / mse_l
    out = {"n": n, "total_variance": mse, "total_variance_se": _jackknife_se(mse_l),
           "sample_variance": var, "sample_variance_se": _jackknife_se(var_l),
           "bias_sq": bias, "bias_sq_se": _jackknife_se(bias_l),
           "signal": signal, "signal_se_bound": signal_se_bound, "ref_noise": ref_noise,
           "raw_mean_sq_dev": float(sum_a / n), "snr": snr,
           "snr_se": _jackknife_se(snr_l) if mse > 0 else float("nan"), "n_refs": k}
    if batch_size is not None:
        for key in ("total_variance", "sample_variance", "bias_sq"):
            out[f"{key}_times_b"] = out[key] * batch_size
            out[f"{key}_times_b_se"] = out[f"{key}_se"] * batch_size
    out["_loo"] = {"total_variance": mse_l, "snr": snr_l}
    return out


def gradient_noise(grad_fn: Callable[[int], torch.Tensor], draws: int, ref_grads,
                   batch_size: int | None = None, progress: bool = False) -> dict:
    """Gradient noise of a stochastic gradient around a reference (see :func:`noise_stats`).

    ``grad_fn(i)`` returns the flattened gradient of draw i (an independent mini-batch);
    ``draws`` >= 3 draws are taken; ``ref_grads`` is ḡ (one 1-D tensor, taken as exact) or
    K >= 2 independent large-batch gradients (ḡ = their mean, its own noise removed).
    """
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 3:
        raise ValueError(f"draws must be an int >= 3 (the jackknife needs n - 2 >= 1), got {draws!r}")
    if not callable(grad_fn):
        raise TypeError("grad_fn must be callable (draw index -> 1-D gradient), "
                        f"got {type(grad_fn).__name__}")
    acc = DeviationGram(ref_grads)
    it = range(draws)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="draws", leave=False)
    for i in it:
        acc.add(grad_fn(i))
    out = noise_stats(acc.gram(), acc.ref_gram, batch_size)
    out.pop("_loo")
    return out


# ============================================================================ the study
def _int_list(name: str, text: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError(f"--{name} must list at least one integer, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minc_train.studies.grad_variance",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", choices=("cpu", "gpu"), default="cpu",
                   help="preset for --draws/--ref-batch/--warmup-steps (cpu: ~10-15 min on 1 thread)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny net, few draws)")
    p.add_argument("--batch-sizes", help="comma-separated b (default: the budget's 32..1024)")
    p.add_argument("--draws", help="draws per b: one int, or one per batch size (default: the budget's)")
    p.add_argument("--ref-batch", type=int, help="images in each reference batch giving ḡ")
    p.add_argument("--ref-draws", type=int, default=2,
                   help="independent reference batches (>= 2 lets the noise of ḡ be removed)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--warmup-steps", type=int, help="MINC training steps before measuring")
    p.add_argument("--warmup-batch", type=int, help="batch size of the warm-up")
    p.add_argument("--dataset", choices=("fashion-mnist", "folder"), default="fashion-mnist")
    p.add_argument("--data-dir", help="fashion-mnist: where the idx files are; folder: ImageFolder root")
    p.add_argument("--image-size", type=int,
                   help="crop size (default: 28 for Fashion-MNIST, 224 for folders)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    p.add_argument("--from-json", metavar="RESULTS_JSON",
                   help="only re-write table.md and the PNGs (into --out) from an existing results.json")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse and validate; budget presets fill what was not given.  Errors exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    budget = BUDGETS["quick" if args.quick else args.budget]
    args.budget_name = "quick" if args.quick else args.budget
    args.train_args = list(budget["train_args"])
    try:
        args.batch_sizes = _int_list("batch-sizes", args.batch_sizes or budget["batch_sizes"])
        draws = _int_list("draws", args.draws or budget["draws"])
    except ValueError as exc:
        parser.error(str(exc))
    if len(draws) == 1:
        draws = draws * len(args.batch_sizes)
    if len(draws) != len(args.batch_sizes):
        parser.error(f"--draws must be one int or one per batch size ({len(args.batch_sizes)}), "
                     f"got {len(draws)}")
    args.draws = draws
    for name in ("ref_batch", "warmup_steps", "warmup_batch"):
        if getattr(args, name) is None:
            setattr(args, name, budget[name])
    if any(b < 2 for b in args.batch_sizes):
        parser.error(f"--batch-sizes must all be >= 2 (spectral/MIO/BatchNorm), got {args.batch_sizes}")
    if any(n < 3 for n in args.draws):
        parser.error(f"--draws must all be >= 3 (the jackknife needs them), got {args.draws}")
    if args.ref_batch < max(args.batch_sizes):
        parser.error(f"--ref-batch ({args.ref_batch}) must be >= the largest batch size "
                     f"({max(args.batch_sizes)})")
    if args.ref_draws < 1:
        parser.error(f"--ref-draws must be >= 1, got {args.ref_draws}")
    if args.warmup_steps < 1 or args.warmup_batch < 2:
        parser.error("--warmup-steps must be >= 1 (MINC's M comes from it) and --warmup-batch >= 2, "
                     f"got {args.warmup_steps}, "
                     f"{args.warmup_batch}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--methods must be a comma-separated subset of {','.join(METHODS)}, "
                     f"got {args.methods!r}")
    args.methods = [m for m in METHODS if m in methods]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but no CUDA device is available")
    if args.dataset == "folder" and not args.data_dir:
        parser.error("--data-dir is required with --dataset folder")
    return args


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_warm_state(args, work_dir: str):
    """The training program's MINC Trainer (CPU preset), trained for ``warmup_steps`` steps.
    Returns (trainer, warm-up info dict)."""
    from minc_train import cli
    from minc_train.engine import Trainer
    train_argv = ["--method", "minc", "--preset", "cpu", "--dataset", args.dataset, "--device", args.device,
                  "--threads", str(args.threads), "--seed", str(args.seed), "--amp", "none",
                  "--batch-size", str(args.warmup_batch), "--epochs", "1",
                  "--epoch-size", str(max(args.warmup_steps, 1) * args.warmup_batch),
                  "--warmup-epochs", "0.2", "--eval-every", "0", "--no-progress", "--no-download",
                  "--out-dir", work_dir, "--ema-backend", "foreach", *args.train_args]
    if args.dataset == "folder":
        train_argv += ["--loader", "memory", "--grayscale"]
    if args.data_dir:
        train_argv += ["--data-dir", args.data_dir]
    if args.image_size:
        train_argv += ["--image-size", str(args.image_size)]
    cfg = cli.resolve_config(train_argv)
    trainer = Trainer(cfg)
    if trainer.stream is not None:
        raise ValueError("the gradient-variance study needs the in-memory loader")
    # the whole warm-up is one lr/EMA schedule of warmup_steps steps, however many epochs
    total = max(args.warmup_steps, 1)
    trainer.set_schedule(total, max(1, int(round(0.2 * total))))
    from tqdm import tqdm
    losses, t0, epoch = [], time.time(), 0
    bar = tqdm(total=args.warmup_steps, desc="warm-up (MINC)", disable=not args.progress, leave=False)
    trainer.train_mode()
    while len(losses) < args.warmup_steps:
        for x1, x2 in trainer.batches(epoch):
            losses.append(float(trainer.train_step(x1, x2)))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if len(losses) >= args.warmup_steps:
                break
        epoch += 1
    bar.close()
    k = trainer.loss_fn.dim
    m = trainer.loss_fn.corrected_moment().detach()
    info = {"method": "minc", "steps": len(losses), "batch_size": args.warmup_batch,
            "wall_s": time.time() - t0, "loss_first": losses[0] if losses else None,
            "loss_last10_mean": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None,
            "optimizer": cfg.optimizer, "lr": trainer.base_lr, "weight_decay": cfg.weight_decay,
            "ema_base": cfg.ema_base, "moment_momentum": cfg.moment_momentum,
            "moment_updates": int(trainer.loss_fn.num_updates), "moment_trace": float(torch.trace(m)),
            "moment_eff_rank": _eff_rank_psd(m), "proj_dim": k,
            "network": {"arch": cfg.arch, "width": cfg.width, "pool": cfg.pool,
                        "proj_hidden": cfg.proj_hidden,
                        "proj_dim": cfg.proj_dim, "pred_hidden": cfg.pred_hidden,
                        "proj_layers": cfg.proj_layers, "augment": cfg.augment, "normalize": cfg.normalize,
                        "image_size": cfg.image_size}}
    return trainer, info


def _eff_rank_psd(m: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(m.double().cpu()).clamp_min(0)
    p = ev / ev.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class GradientSampler:
    """Gradients of every method's loss on one fixed warmed-up state (see the module docstring)."""

    def __init__(self, trainer, methods: Sequence[str]):
        from minc_kernels import MINCLoss, SpectralContrastiveLoss
        self.tr, self.methods = trainer, list(methods)
        self.device = trainer.device
        model = trainer.model
        model.train()  # BN in training mode: batch statistics, as training sees them
        if trainer.target is not None:
            trainer.target.target.train()
        for mod in list(model.modules()) + list(trainer.target.target.modules()):
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.momentum = 0.0  # running stats frozen: the state does not drift while measuring
        self.enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
        self.pred_params = [p for p in model.predictor.parameters() if p.requires_grad]
        self.n_enc = sum(p.numel() for p in self.enc_params)
        self.n_pred = sum(p.numel() for p in self.pred_params)
        self.minc_ema = trainer.loss_fn.eval()  # eval: M is used, never updated
        k = trainer.loss_fn.dim
        self.minc_batch = M.build_loss("minc", k, moment_momentum=0.0).to(self.device).train()
        self.spectral = M.build_loss("spectral", k, mu=float(trainer.cfg.mu)).to(self.device)
        self.spectral_noclip = SpectralContrastiveLoss(mu=1.0, clip=False).to(self.device)
        # no bias correction: the buffer is the M used (set by set_population_moment); raw
        # features (feature_norm="none"): this is the spectral objective (no clip) through M
        self.spectral_moment = MINCLoss(trainer.loss_fn.dim, bias_correction=False, feature_norm="none").to(self.device).eval()
        self.mio = M.build_loss("mio", k).to(self.device)
        self.images = trainer.train_ds.images
        self.population_moment_info = None

    @torch.no_grad()
    def set_population_moment(self, size: int, seed: int) -> None:
        """M = E[z zᵀ] of the online projections (both views, BN in training mode) from one
        batch of ``size`` images, for ``spectral_moment``."""
        x1, x2 = self.batch(size, seed)
        z1, z2 = self.tr.model.encoder(x1).float(), self.tr.model.encoder(x2).float()
        m = (z1.T @ z1 + z2.T @ z2) / (2 * size)
        self.spectral_moment.moment.copy_(m)
        self.spectral_moment.num_updates.fill_(1)
        self.population_moment_info = {"batch_size": size, "trace": float(torch.trace(m)),
                                       "eff_rank": _eff_rank_psd(m),
                                       "mean_row_norm": float(torch.cat([z1, z2]).norm(dim=1).mean())}

    def batch(self, size: int, seed: int):
        """Two augmented views of ``size`` training images drawn without replacement."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.images.shape[0], generator=g)[:size]
        x = self.images[idx]
        return self.tr.two_views(x, g)

    def losses(self, x1, x2) -> dict:
        # the training program's wiring (minc_train.methods): the same views, heads and
        # symmetric MINC call as Trainer.train_step
        v = M.forward_views(self.tr.model, self.tr.target, x1, x2)
        normalize = self.tr.cfg.normalize
        out = {}
        for m in self.methods:
            if m == "spectral":
                out[m] = M.compute_loss("spectral", self.spectral, v)
            elif m == "mio":
                out[m] = M.compute_loss("mio", self.mio, v)
            elif m == "minc_ema":
                out[m] = M.compute_loss("minc", self.minc_ema, v, normalize)
            elif m == "minc_batch":
                out[m] = M.compute_loss("minc", self.minc_batch, v, normalize)
            elif m == "spectral_noclip":
                out[m] = M.compute_loss("spectral", self.spectral_noclip, v)
            elif m == "spectral_moment":
                # the spectral objective through a fixed M: a MINC module on (z1, z2) pairs
                out[m] = self.spectral_moment((v.z1, v.z2), (v.z2, v.z1))
        return out

    def grads(self, size: int, seed: int) -> tuple[dict, dict]:
        """{method: (encoder grad, predictor grad or None)} flattened, and {method: loss}."""
        x1, x2 = self.batch(size, seed)
        losses = self.losses(x1, x2)
        out = {}
        for i, (m, loss) in enumerate(losses.items()):
            minc = m.startswith("minc")  # the predictor is used by the MINC losses only
            params = self.enc_params + (self.pred_params if minc else [])
            gs = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                              for g, p in zip(gs, params)])
            out[m] = (flat[:self.n_enc], flat[self.n_enc:] if minc else None)
        return out, {m: float(v.detach()) for m, v in losses.items()}


def _seed(base: int, *parts: int) -> int:
    s = base * 1_000_003 + 17
    for p in parts:
        s = (s * 7_919 + p + 101) % (2 ** 62)
    return s


def run_study(args) -> dict:
    """Warm up, measure, write results.json / table.md / PNGs; returns the results dict."""
    from tqdm import tqdm
    t_start = time.time()
    cpu_start = time.process_time()
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available() and args.device != "cpu":
        torch.backends.cudnn.allow_tf32 = False  # plain fp32 gradients on the GPU too
        torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="grad_variance_") as work:
        trainer, warm = build_warm_state(args, work)
    n_train = trainer.train_ds.images.shape[0]
    if args.ref_batch > n_train:
        raise ValueError(f"--ref-batch ({args.ref_batch}) exceeds the {n_train} training images")
    sampler = GradientSampler(trainer, args.methods)
    phases = {"warmup_s": warm["wall_s"]}
    if "spectral_moment" in args.methods:
        t0 = time.time()
        sampler.set_population_moment(args.ref_batch, _seed(args.seed, 3))
        phases["population_moment_s"] = time.time() - t0

    # ---- reference gradients: K independent large batches
    t0 = time.time()
    refs = {m: ([], []) for m in args.methods}
    ref_losses = {m: [] for m in args.methods}
    for k in tqdm(range(args.ref_draws), desc=f"reference batches of {args.ref_batch}",
                  disable=not args.progress, leave=False):
        g, losses = sampler.grads(args.ref_batch, _seed(args.seed, 1, k))
        for m, (ge, gp) in g.items():
            refs[m][0].append(ge.detach().clone())
            if gp is not None:
                refs[m][1].append(gp.detach().clone())
            ref_losses[m].append(losses[m])
        del g
    phases["reference_s"] = time.time() - t0

    # ---- draws at each batch size
    results = {m: {"label": LABELS[m], "per_batch": [],
                   "with_predictor": [] if m.startswith("minc") else None} for m in args.methods}
    comparisons = []
    t0 = time.time()
    total_images = sum(b * n for b, n in zip(args.batch_sizes, args.draws))
    bar = tqdm(total=total_images, desc="draws (images)", disable=not args.progress, unit="img")
    for bi, (b, n) in enumerate(zip(args.batch_sizes, args.draws)):
        tb = time.time()
        acc = {m: (DeviationGram(refs[m][0]), DeviationGram(refs[m][1]) if refs[m][1] else None)
               for m in args.methods}
        loss_sum = {m: 0.0 for m in args.methods}
        for i in range(n):
            g, losses = sampler.grads(b, _seed(args.seed, 2, b, i))
            for m, (ge, gp) in g.items():
                acc[m][0].add(ge)
                if gp is not None:
                    acc[m][1].add(gp)
                loss_sum[m] += losses[m]
            del g
            bar.update(b)
            bar.set_postfix(b=b, draw=f"{i + 1}/{n}")
        loo = {}
        for m in args.methods:
            enc_g = acc[m][0].gram()
            st = noise_stats(enc_g, acc[m][0].ref_gram, b)
            loo[m] = st.pop("_loo")
            st.update({"batch_size": b, "mean_loss": loss_sum[m] / n})
            results[m]["per_batch"].append(st)
            if acc[m][1] is not None:
                full = noise_stats(enc_g + acc[m][1].gram(), acc[m][0].ref_gram + acc[m][1].ref_gram, b)
                full.pop("_loo")
                full["batch_size"] = b
                results[m]["with_predictor"].append(full)
        row = {"batch_size": b}
        for m, base in PAIRS:
            if m not in args.methods or base not in args.methods:
                continue
            st, bs = results[m]["per_batch"][-1], results[base]["per_batch"][-1]
            # paired: the methods share the draws, so leave the same draw out of both
            snr_l = loo[m]["snr"] / loo[base]["snr"]
            var_l = loo[m]["total_variance"] / loo[base]["total_variance"]
            row[f"{m}/{base}"] = {"snr_ratio": st["snr"] / bs["snr"], "snr_ratio_se": _jackknife_se(snr_l),
                                  "total_variance_ratio": st["total_variance"] / bs["total_variance"],
                                  "total_variance_ratio_se": _jackknife_se(var_l)}
        if len(row) > 1:
            comparisons.append(row)
        del acc
        phases[f"draws_b{b}_s"] = time.time() - tb
    bar.close()
    phases["draws_s"] = time.time() - t0

    for m in args.methods:
        r0 = torch.stack(refs[m][0]).double()
        cos = (float(torch.nn.functional.cosine_similarity(r0[0], r0[1], dim=0))
               if r0.shape[0] >= 2 else None)
        results[m]["reference"] = {"batch_size": args.ref_batch, "n_refs": args.ref_draws,
                                   "losses": ref_losses[m], "cosine_between_refs": cos,
                                   "norm_sq_each": [float((r * r).sum()) for r in r0]}
    # cosine between the methods' ḡ (encoder parameters): ~1 for the controlled pair if the two
    # estimators share their expected gradient, as docs/math.md §2 says they do
    means = {m: torch.stack(refs[m][0]).double().mean(0) for m in args.methods}
    ref_cos = {f"{a}/{b}": float(torch.nn.functional.cosine_similarity(means[a], means[b], dim=0))
               for i, a in enumerate(args.methods) for b in args.methods[i + 1:]}
    del means
    dev = sampler.device
    device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                   (platform.processor() or platform.machine()))
    cfg_json = {k: v for k, v in vars(args).items()}
    out = {
        "study": "gradient variance vs batch size (issue 8, study 1)",
        "command": "python -m minc_train.studies.grad_variance " + " ".join(sys.argv[1:]),
        "config": cfg_json,
        "torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
        "device_name": device_name, "threads": torch.get_num_threads(), "git_commit": _git_commit(),
        "wall_s": time.time() - t_start, "cpu_time_s": time.process_time() - cpu_start, "phases_s": phases,
        "state": {"description": "one network state for all methods: the online encoder (backbone + "
                                 "projector), MINC's predictor and EMA target, and MINC's EMA moment M, "
                                 "after a MINC warm-up; spectral and MIO use the same online encoder's "
                                 "projections (the predictor is unused by them)",
                  "warmup": warm, "encoder_params": sampler.n_enc, "predictor_params": sampler.n_pred,
                  "population_moment": sampler.population_moment_info},
        "measurement": {
            "batchnorm": "training mode (batch statistics), as training applies it; BN momentum set to 0 so "
                         "running statistics stay fixed; the EMA target also in training mode as in Trainer",
            "gradient": "w.r.t. every online encoder parameter (backbone + projector), flattened; for the "
                        "MINC methods 'with_predictor' adds the predictor's parameters",
            "minc_ema": "MINCLoss of the warm-up in eval mode: its EMA M (bias-corrected) held fixed",
            "minc_batch": "MINCLoss(moment_momentum=0) in training mode: M = moment of this batch's targets",
            "reference": f"ḡ = mean of {args.ref_draws} independent batches of {args.ref_batch}; its noise "
                         "(spread of the references) removed from total_variance and bias_sq; signal = mean "
                         "<r_k, r_l>, k != l",
            "draws": "independent: fresh images (without replacement within a batch) and fresh "
                     "augmentations; "
                     "the same draws for every method at a given b (paired comparisons)",
            "standard_errors": "delete-one jackknife over draws, references held fixed; signal_se_bound is "
                               "an upper bound of the reference signal's own SE (common to all b)",
        },
        "methods": results,
        "paired_ratios": comparisons,
        "reference_cosines": ref_cos,
        "flatness": _flatness(results),
    }
    write_json(out, os.path.join(args.out, "results.json"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(format_table(out))
    out["plots"] = make_plots(out, args.out)
    return out


def _flatness(results: dict) -> dict:
    """Per method: α of a weighted least-squares fit log total_variance = c + α log b, and
    variance·b at the smallest b over that at the largest b, with SEs (independent b's)."""
    out = {}
    for m, r in results.items():
        pts = [p for p in r["per_batch"] if p["total_variance"] > 0 and p["total_variance_se"] > 0]
        if len(pts) < 2:
            continue
        x = torch.tensor([math.log(p["batch_size"]) for p in pts], dtype=torch.float64)
        y = torch.tensor([math.log(p["total_variance"]) for p in pts], dtype=torch.float64)
        w = torch.tensor([(p["total_variance"] / p["total_variance_se"]) ** 2 for p in pts],
                         dtype=torch.float64)  # 1 / Var(log v) by the delta method
        xm = (w * x).sum() / w.sum()
        sxx = (w * (x - xm) ** 2).sum()
        alpha = float((w * (x - xm) * y).sum() / sxx)
        lo, hi = pts[0], pts[-1]
        ratio = lo["total_variance_times_b"] / hi["total_variance_times_b"]
        rel = math.hypot(lo["total_variance_se"] / lo["total_variance"],
                         hi["total_variance_se"] / hi["total_variance"])
        out[m] = {"alpha": alpha, "alpha_se": float(1 / sxx.sqrt()), "ratio_small_to_large": ratio,
                  "ratio_small_to_large_se": ratio * rel, "b_small": lo["batch_size"],
                  "b_large": hi["batch_size"]}
    return out


def _pm(v, se, digits=3) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g} ± {se:.2g}"


def format_table(res: dict) -> str:
    """Markdown tables (SNR, total variance x b, decomposition) from the results dict."""
    methods = list(res["methods"])
    bs = [r["batch_size"] for r in res["methods"][methods[0]]["per_batch"]]
    ns = [r["n"] for r in res["methods"][methods[0]]["per_batch"]]
    labels = [res["methods"][m]["label"] for m in methods]
    ref = res["config"]["ref_batch"]
    lines = [f"Gradient noise vs batch size b on one warmed-up state ({res['state']['warmup']['steps']} MINC "
             f"steps), {res['device']}, {res['threads']} thread(s), wall {res['wall_s'] / 60:.1f} min.",
             f"ḡ from {res['config']['ref_draws']} independent batches of {ref}; "
             "± = jackknife SE over draws.", "",
             "**SNR = ‖ḡ‖² / E‖g_b − ḡ‖²** (comparable across methods; higher is better)", "",
             "| b | draws | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(methods)]
    for i, (b, n) in enumerate(zip(bs, ns)):
        cells = [_pm(res["methods"][m]["per_batch"][i]["snr"], res["methods"][m]["per_batch"][i]["snr_se"])
                 for m in methods]
        lines.append(f"| {b} | {n} | " + " | ".join(cells) + " |")
    pairs = [k for k in (res.get("paired_ratios") or [{}])[0] if k != "batch_size"]
    if pairs:
        def name(pair):
            a, b = pair.split("/")
            return f"{res['methods'][a]['label']} ÷ {res['methods'][b]['label']}"
        lines += ["", "**Paired ratios: SNR ratio / total-variance ratio** (paired jackknife SE: the "
                  "methods share the draws; the variance ratio is meaningful only within the controlled "
                  "pair, which has one objective and one scale)", "",
                  "| b | " + " | ".join(name(p) for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
        for row in res["paired_ratios"]:
            lines.append(f"| {row['batch_size']} | " + " | ".join(
                f"{_pm(row[p]['snr_ratio'], row[p]['snr_ratio_se'])} / "
                f"{_pm(row[p]['total_variance_ratio'], row[p]['total_variance_ratio_se'])}"
                for p in pairs) + " |")
    lines += ["", "**Total variance × b = b · E‖g_b − ḡ‖²** (per loss; levels differ by the "
              "loss's scale, "
              "compare the trend in b)", "",
              "| b | " + " | ".join(labels) + " |", "|---|" + "---|" * len(methods)]
    for i, b in enumerate(bs):
        cells = [_pm(res["methods"][m]["per_batch"][i]["total_variance_times_b"],
                     res["methods"][m]["per_batch"][i]["total_variance_times_b_se"]) for m in methods]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    if res.get("flatness"):
        lines += ["", "**Scaling with b**: α of total variance ∝ b^α (weighted fit; -1 = per-sample "
                  "mean), "
                  f"and variance·b at b={bs[0]} ÷ at b={bs[-1]}", "",
                  "| method | α | ratio |", "|---|---|---|"]
        for m in methods:
            f = res["flatness"].get(m)
            if f:
                lines.append(f"| {res['methods'][m]['label']} | {_pm(f['alpha'], f['alpha_se'])} | "
                             f"{_pm(f['ratio_small_to_large'], f['ratio_small_to_large_se'])} |")
    lines += ["", "**Decomposition × b: sample variance tr Cov(g_b) · b / bias² "
              "‖E g_b − ḡ‖² · b**"
              "\n(bias² estimates are unbiased, so they can come out negative)", "",
              "| b | " + " | ".join(labels) + " |", "|---|" + "---|" * len(methods)]
    for i, b in enumerate(bs):
        cells = []
        for m in methods:
            r = res["methods"][m]["per_batch"][i]
            cells.append(f"{_pm(r['sample_variance_times_b'], r['sample_variance_times_b_se'])} / "
                         f"{_pm(r['bias_sq_times_b'], r['bias_sq_times_b_se'], 2)}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "**References** (signal ‖ḡ‖², its SE bound, cosine between the independent "
              "reference gradients)", "", "| method | ‖ḡ‖² | SE bound | cos(r1, r2) | ref loss |",
              "|---|---|---|---|---|"]
    for m in methods:
        r0 = res["methods"][m]["per_batch"][0]
        rf = res["methods"][m]["reference"]
        cos = rf["cosine_between_refs"]
        lines.append(f"| {res['methods'][m]['label']} | {r0['signal']:.4g} | {r0['signal_se_bound']:.2g} | "
                     f"{'n/a' if cos is None else f'{cos:.3f}'} | "
                     f"{sum(rf['losses']) / len(rf['losses']):.4g} |")
    return "\n".join(lines) + "\n"


def make_plots(res: dict, out_dir: str) -> list[str]:
    """variance_times_b.png (left: b·E‖g_b − ḡ‖² in each loss's own units; right: the same
    divided by its inverse-variance-weighted mean over b, so the trends of all losses share one axis) and
    snr.png; log-log, one line per method, jackknife error bars."""
    plt = pyplot(required=True)
    title_sfx = (f"{res['state']['warmup']['steps']}-step MINC warm-up, same state for all; "
                 f"ḡ from {res['config']['ref_draws']}×{res['config']['ref_batch']} images; ±1 SE")

    def series(r, key, norm=False):
        pts = [(p["batch_size"], p[key], p[f"{key}_se"]) for p in r["per_batch"]
               if math.isfinite(p[key]) and p[key] > 0]
        if norm and pts:
            # divide by the inverse-variance-weighted mean over b (stabler than any one point)
            w = [1 / se ** 2 if se > 0 else 0.0 for _, _, se in pts]
            ref = sum(wi * v for wi, (_, v, _) in zip(w, pts)) / sum(w) if sum(w) > 0 else pts[-1][1]
            pts = [(b, v / ref, se / ref) for b, v, se in pts]
        return pts

    def draw(ax, key, norm=False):
        for m, r in res["methods"].items():
            pts = series(r, key, norm)
            if not pts:
                continue
            color, marker, ls = STYLE[m]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        label=r["label"], color=color, marker=marker, ls=ls, capsize=3, lw=1.5, ms=5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size b")
        ax.grid(True, which="both", alpha=0.3)

    paths = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 5.2), dpi=110)
    draw(a1, "total_variance_times_b")
    a1.set_ylabel("b · E‖g_b − ḡ‖²  (each loss in its own units)")
    a1.set_title("variance × b", fontsize=10)
    draw(a2, "total_variance_times_b", norm=True)
    a2.axhline(1.0, color="grey", lw=0.8)
    from matplotlib.ticker import FormatStrFormatter
    a2.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    a2.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    a2.set_ylabel("variance × b  ÷  its weighted mean over b")
    a2.set_title("the same, normalised: flat = 1/b like a per-sample mean", fontsize=10)
    handles, labels = a1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle("Gradient variance × batch size\n" + title_sfx, fontsize=10)
    paths.append(save_figure(fig, os.path.join(out_dir, "variance_times_b.png"), rect=(0, 0.1, 1, 1)))

    fig, ax = plt.subplots(figsize=(7.5, 5.6), dpi=110)
    draw(ax, "snr")
    ax.set_ylabel("SNR = ‖ḡ‖² / E‖g_b − ḡ‖²")
    ax.set_title("Gradient signal-to-noise ratio\n" + title_sfx, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    paths.append(save_figure(fig, os.path.join(out_dir, "snr.png")))
    return paths


def main(argv=None) -> int:
    args = resolve_args(argv)
    if args.from_json:
        if not os.path.isfile(args.from_json):
            build_parser().error(f"--from-json {args.from_json!r}: no such file")
        with open(args.from_json) as f:
            res = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(format_table(res))
        paths = make_plots(res, args.out)
        print(format_table(res))
        print("wrote table.md, " + ", ".join(os.path.basename(p) for p in paths))
        return 0
    try:
        res = run_study(args)
    except (ValueError, FileNotFoundError) as exc:
        build_parser().error(str(exc))
    print(format_table(res))
    print(f"wrote {os.path.join(args.out, 'results.json')}, table.md, "
          + ", ".join(os.path.basename(p) for p in res["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
