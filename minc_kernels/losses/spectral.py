"""Spectral contrastive loss (HaoChen et al. 2021), docs/math.md §1: the module, the
functional form, the dispatch (Triton op, eager math, distributed composition) and the eager
math every fast path is checked against.  Kernels: :mod:`minc_kernels.ops.spectral`."""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as D
from .._backend import preload, requested_backend, select, size_hint
from .._validation import check_choice, check_pair, check_positive
from ._common import CheckedHyperParams, LossSpec, acc, clip_rows

__all__ = ["SpectralContrastiveLoss", "spectral_contrastive_loss", "spectral_loss_reference",
           "spectral_pairwise_term", "spectral_gram_term", "spectral_dist_comm_choice",
           "ALGORITHMS", "DIST_COMMS", "SPEC"]

ALGORITHMS = ("auto", "pairwise", "matrix", "gram")
DIST_COMMS = ("auto", "gram", "gather")


# --------------------------------------------------------------------------- eager math
def spectral_pairwise_term(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``Σ_{i≠j} (z1_i·z2_j)^2`` through the B×B matrix ``S = Z1 Z2ᵀ`` (O(B²k))."""
    s = acc(z1 @ z2.T)
    return s.pow(2).sum() - torch.diagonal(s).pow(2).sum()


def spectral_gram_term(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``Σ_{i≠j} (z1_i·z2_j)^2 = <Z1ᵀZ1, Z2ᵀZ2>_F - Σ_i (z1_i·z2_i)^2`` (O(Bk²))."""
    g1 = acc(z1.T @ z1)
    g2 = acc(z2.T @ z2)
    diag = (acc(z1) * acc(z2)).sum(dim=1)
    return (g1 * g2).sum() - diag.pow(2).sum()


def spectral_loss_reference(z1: torch.Tensor, z2: torch.Tensor, mu: float = 1.0,
                            clip: bool = True, algorithm: str = "auto") -> torch.Tensor:
    """The eager oracle, float32 scalar (float64 for float64 inputs).

    ``L = ( -(2/B) Σ_i z1_i·z2_i + 1/(B(B-1)) Σ_{i≠j} (z1_i·z2_j)^2 ) / mu`` after
    per-row norm clipping to ``sqrt(mu)`` (``clip=True``).
    ``algorithm``: ``"pairwise"`` (B×B matrix; ``"matrix"`` is the same eager math: the
    two differ only in the kernels), ``"gram"`` (k×k Grams) or ``"auto"`` (the cheaper one
    by flop count: B²k vs 2Bk²).
    """
    b, k = z1.shape
    if clip:
        z1 = clip_rows(z1, mu)
        z2 = clip_rows(z2, mu)
    if algorithm == "auto":
        # both are exact: choose on the sizes' hints, without guarding a traced graph on them
        hb, hk = size_hint(b), size_hint(k)
        algorithm = "pairwise" if hb is not None and hk is not None and hb <= 2 * hk else "gram"
    if algorithm in ("pairwise", "matrix"):
        off = spectral_pairwise_term(z1, z2)
    elif algorithm == "gram":
        off = spectral_gram_term(z1, z2)
    else:
        raise ValueError(f"algorithm must be 'auto', 'pairwise', 'matrix' or 'gram', got "
                         f"{algorithm!r}")
    pos = (acc(z1) * acc(z2)).sum()
    return (-2.0 / b * pos + off / (b * (b - 1))) / mu


# --------------------------------------------------------------------------- functional
def check_config(choice: str, gather_distributed: bool, dist_comm: str) -> None:
    """An explicit ``backend="triton"`` must be honoured: the distributed ``"gram"``
    communication is composed in eager PyTorch, so that combination is refused."""
    if choice == "triton" and gather_distributed and dist_comm == "gram":
        raise ValueError("backend='triton' cannot be honoured with gather_distributed=True and "
                         "dist_comm='gram' (the all-reduced Gram form is composed in eager "
                         "PyTorch); use dist_comm='gather' (or 'auto', which then gathers) or "
                         "backend='auto'")


def spectral_contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    mu: float = 1.0,
    clip: bool = True,
    algorithm: str = "auto",
    backend: str | None = None,
    gather_distributed: bool = False,
    dist_comm: str = "auto",
) -> torch.Tensor:
    """Spectral contrastive loss of (B, k) views ``z1``, ``z2`` (docs/math.md §1); B >= 2.

    ``L = ( -(2/B) Σ_i z1_i·z2_i + 1/(B(B-1)) Σ_{i≠j} (z1_i·z2_j)^2 ) / mu`` after clipping
    each row's norm to at most ``sqrt(mu)`` (``clip=True``).  ``algorithm`` picks the
    evaluation, all exact (``"auto"``: a measured table for the GPU, else a cost model):
    ``"pairwise"`` streams tiles of ``S = Z1 Z2ᵀ`` and never stores it (O(Bk) memory; with
    a gradient it recomputes each tile once per 64-128 gradient columns), ``"matrix"``
    writes ``S`` (B×B fp32) once and takes the gradient from it (O(B²) memory; the choice
    when B < k), ``"gram"`` goes through the k×k feature Grams (O(k²); when B > k).

    ``gather_distributed=True`` (docs/math.md §5), inside an initialised process group of
    W > 1 ranks: ``L`` of the *global* batch (B = Σ_r B_r, every cross-rank pair included),
    the same value on every rank, with gradients such that DDP's averaging applies
    exactly the single-process gradient.  ``dist_comm``: ``"gram"`` all-reduces the
    k×k Grams ``Z1ᵀZ1, Z2ᵀZ2`` and three scalars (eager PyTorch: refused with an explicit
    ``backend="triton"``); ``"gather"`` all-gathers the (B, k) features and evaluates the
    loss on them; ``"auto"`` picks the fewer bytes (:func:`spectral_dist_comm_choice`,
    after a size exchange), or ``"gather"`` under an explicit ``backend="triton"``.
    A no-op when not distributed.
    """
    choice = requested_backend(backend)
    gather = bool(gather_distributed) and D.is_distributed()
    check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
    mu = check_positive("mu", mu)
    check_choice("algorithm", algorithm, ALGORITHMS)
    check_choice("dist_comm", dist_comm, DIST_COMMS)
    check_config(choice, bool(gather_distributed), dist_comm)
    return _spectral(z1, z2, mu, bool(clip), algorithm, choice, gather, dist_comm)


def _spectral(z1, z2, mu: float, clip: bool, algorithm: str, choice: str, gather: bool,
              dist_comm: str) -> torch.Tensor:
    """Checked arguments; ``gather``: a process group of W > 1 ranks is active."""
    if gather:
        return _spectral_distributed(z1, z2, mu, clip, algorithm, choice, dist_comm)
    op = select(choice, "spectral", z1)
    if op is None:
        return spectral_loss_reference(z1, z2, mu=mu, clip=clip, algorithm=algorithm)
    return op.spectral_loss(z1, z2, mu, clip, algorithm)


# --------------------------------------------------------------------------- distributed (docs/math.md §5)
def spectral_dist_comm_choice(k: int, global_batch: int, feature_bytes: int,
                              acc_bytes: int = 4) -> str:
    """``"gram"`` or ``"gather"``: the distributed spectral communication with fewer bytes per step.

    Per rank, forward + backward, ring collectives, up to the common factor (W-1)/W:
    ``"gram"`` all-reduces ``2k² + 3`` accumulator elements twice (forward values, backward
    gradients) at 2x for an all-reduce: ``4·(2k²+3)·acc_bytes``; ``"gather"`` all-gathers the
    ``B×2k`` features and reduce-scatters their gradients: ``2·2Bk·feature_bytes``.
    Roughly: the Grams win when ``k < B·feature_bytes / (2·acc_bytes)``.
    """
    gram = 4 * (2 * k * k + 3) * acc_bytes
    gather = 2 * 2 * global_batch * k * feature_bytes
    return "gram" if gram <= gather else "gather"


def _spectral_distributed(z1, z2, mu, clip, algorithm, choice, dist_comm):
    """Global-batch spectral loss, identical on every rank (module docstring of ``distributed``)."""
    k = z1.shape[1]
    sizes = None
    if dist_comm == "auto" and choice == "triton":
        dist_comm = "gather"  # the form that runs the kernels the caller asked for
    if dist_comm == "auto":
        sizes = D.gather_sizes(z1.shape[0], z1.device)
        acc_bytes = 8 if z1.dtype == torch.float64 else 4
        dist_comm = spectral_dist_comm_choice(k, sum(sizes), z1.element_size(), acc_bytes)
    if dist_comm == "gather":
        # One gather of [z1 | z2]; clipping is per row, so clipping after the gather is the same.
        zg = D.all_gather(torch.cat([z1, z2], dim=1), sizes=sizes)
        return _spectral(zg[:, :k].contiguous(), zg[:, k:].contiguous(), mu, clip, algorithm,
                         choice, False, dist_comm)
    # "gram": everything the loss needs is a sum over rows; all-reduce those sums (packed).
    if clip:
        z1 = clip_rows(z1, mu)
        z2 = clip_rows(z2, mu)
    g1 = acc(z1.T @ z1)
    g2 = acc(z2.T @ z2)
    dots = (acc(z1) * acc(z2)).sum(dim=1)
    count = torch.full((1,), float(z1.shape[0]), dtype=g1.dtype, device=g1.device)
    packed = torch.cat([g1.reshape(-1), g2.reshape(-1), dots.sum().reshape(1),
                        dots.pow(2).sum().reshape(1), count])
    red = D.all_reduce_sum(packed)
    kk = k * k
    pos, diag_sq, b = red[2 * kk], red[2 * kk + 1], red[2 * kk + 2].detach()
    off = (red[:kk] * red[kk:2 * kk]).sum() - diag_sq
    return (-2.0 * pos / b + off / (b * (b - 1.0))) / mu


# --------------------------------------------------------------------------- module
class SpectralContrastiveLoss(CheckedHyperParams, nn.Module):
    """Spectral contrastive loss (HaoChen et al. 2021), docs/math.md §1.

    Args:
        mu: the loss's scale; rows are clipped to norm ``sqrt(mu)`` (default 1.0).
        clip: apply the norm clipping (default True, as the authors' code).
        algorithm: ``"auto"`` | ``"pairwise"`` | ``"matrix"`` | ``"gram"`` evaluation of the
            pairwise term (see :func:`spectral_contrastive_loss`).
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env
            ``MINC_KERNELS_BACKEND``, read here, or ``"auto"``).
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, compute the loss
            of the *global* batch (every cross-rank pair included); the returned value is
            the global loss, equal on every rank, and DDP's gradient averaging applies
            exactly the gradient of one process holding the whole batch (default False;
            a no-op when not distributed).  See ``docs/distributed.md``.
        dist_comm: ``"auto"`` | ``"gram"`` (all-reduce the k×k Grams; eager PyTorch, so
            refused with ``backend="triton"``) | ``"gather"`` (all-gather the features);
            ``"auto"`` picks the fewer bytes per step (``"gather"`` under ``backend="triton"``).

    ``forward(z1, z2)``: two (B, k) views of one dtype, row i of one the positive of row i
    of the other; returns a scalar (float32; float64 for float64 inputs).
    """

    _hparam_checks = {  # run on every assignment, here and after construction
        "mu": lambda v: check_positive("mu", v),
        "clip": bool,
        "algorithm": lambda v: check_choice("algorithm", v, ALGORITHMS),
        "dist_comm": lambda v: check_choice("dist_comm", v, DIST_COMMS),
        "gather_distributed": bool,
    }

    def __init__(self, mu: float = 1.0, clip: bool = True, algorithm: str = "auto",
                 backend: str | None = None, gather_distributed: bool = False,
                 dist_comm: str = "auto"):
        super().__init__()
        self.mu = mu
        self.clip = clip
        self.algorithm = algorithm
        self.backend = backend  # also sets self._choice
        self.gather_distributed = gather_distributed
        self.dist_comm = dist_comm
        check_config(self._choice, self.gather_distributed, self.dist_comm)
        preload("spectral", self._choice)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        gather = self.gather_distributed and D.is_distributed()
        check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
        return _spectral(z1, z2, self.mu, self.clip, self.algorithm, self._choice, gather,
                         self.dist_comm)

    def extra_repr(self) -> str:
        s = (f"mu={self.mu}, clip={self.clip}, algorithm={self.algorithm!r}, "
             f"backend={self.backend!r}")
        if self.gather_distributed:
            s += f", gather_distributed=True, dist_comm={self.dist_comm!r}"
        return s


# --------------------------------------------------------------------------- registry entry
def _step(z1, z2, backend=None, **variant):
    return spectral_contrastive_loss(z1, z2, backend=backend, **variant)


def _flops(b: int, k: int) -> tuple[float, float]:
    # the cheaper exact evaluation: pairwise (S = Z1 Z2ᵀ; bwd G Z2, Gᵀ Z1) or gram
    # (Z1ᵀZ1, Z2ᵀZ2; bwd Z1 G2, Z2 G1)
    pairwise = (2.0 * b * b * k, 4.0 * b * b * k)
    gram = (4.0 * b * k * k, 4.0 * b * k * k)
    return min(pairwise, gram, key=sum)


SPEC = LossSpec(
    name="spectral", module=SpectralContrastiveLoss, functional=spectral_contrastive_loss,
    reference=spectral_loss_reference, step=_step, arg_names=("z1", "z2"), grad_args=(0, 1),
    op="spectral", matmul_flops=_flops,
    variants={"pairwise": {"algorithm": "pairwise"}, "matrix": {"algorithm": "matrix"},
              "gram": {"algorithm": "gram"}},
    eager_alias={"matrix": "pairwise"},
)
