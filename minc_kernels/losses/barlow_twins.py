"""Barlow Twins loss (Zbontar et al. 2021), docs/math.md §7: the module, the functional
form, the dispatch (Triton op, eager math, distributed composition) and the eager math every
fast path is checked against.  A drop-in for ``lightly.loss.BarlowTwinsLoss``: same
constructor names and defaults, same formula (lightly's batch standardisation, ``c / N``),
same ``gather_distributed`` semantics.  Kernels: :mod:`minc_kernels.ops.barlow_twins`.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as D
from .._backend import preload, requested_backend, select
from .._validation import check_choice, check_nonnegative, check_pair
from ._common import LossSpec, acc

__all__ = ["BarlowTwinsLoss", "barlow_twins_loss", "barlow_twins_loss_reference",
           "barlow_twins_standardize", "BN_EPS", "ALGORITHMS", "SPEC"]

ALGORITHMS = ("auto", "pairwise", "gram")
#: the variance epsilon of the batch standardisation (``F.batch_norm``'s default, as lightly)
BN_EPS = 1e-5


# --------------------------------------------------------------------------- eager math
def barlow_twins_standardize(z: torch.Tensor) -> torch.Tensor:
    """Each column to batch mean 0 and variance 1: ``(z - m) / sqrt(v + 1e-5)`` with the
    biased batch variance ``v`` (what ``F.batch_norm(z, None, None, training=True)`` does).
    Computed in the accumulation dtype, returned in the storage dtype."""
    za = acc(z)
    zc = za - za.mean(dim=0)
    var = zc.pow(2).mean(dim=0)
    return (zc * torch.rsqrt(var + BN_EPS)).to(z.dtype)


def _loss_from_diag(frob: torch.Tensor, diag: torch.Tensor, lambda_param: float) -> torch.Tensor:
    """``Σ_i (1 - c_ii)² + λ (‖C‖_F² - Σ_i c_ii²)`` from ``‖C‖_F²`` and ``diag(C)``."""
    return (1.0 - diag).pow(2).sum() + lambda_param * (frob - diag.pow(2).sum())


def _loss_from_c(c: torch.Tensor, lambda_param: float) -> torch.Tensor:
    """The loss of a cross-correlation matrix ``c`` (k, k)."""
    diag = torch.diagonal(c)
    off = c.pow(2).sum() - diag.pow(2).sum()
    return (1.0 - diag).pow(2).sum() + lambda_param * off


def barlow_twins_loss_reference(z_a: torch.Tensor, z_b: torch.Tensor,
                                lambda_param: float = 5e-3,
                                algorithm: str = "auto") -> torch.Tensor:
    """The eager oracle, float32 scalar (float64 for float64 inputs).

    ``Ẑ = standardize(Z)`` per column (:func:`barlow_twins_standardize`),
    ``C = Ẑaᵀ Ẑb / N``, ``L = Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²``.
    ``algorithm``: ``"gram"`` forms the k×k ``C`` (lightly's formulation, O(Nk²));
    ``"pairwise"`` uses ``‖C‖_F² = <Ẑa Ẑaᵀ, Ẑb Ẑbᵀ>_F / N²`` (two N×N Grams, O(N²k)) and
    ``C_ii = Σ_n ẑa_ni ẑb_ni / N``; ``"auto"``: the cheaper by flop count (two N×N Grams,
    4N²k, against ``C``, 2Nk²: ``2N <= k`` pairwise).  Both are exact.
    """
    n, k = z_a.shape
    na = barlow_twins_standardize(z_a)
    nb = barlow_twins_standardize(z_b)
    if algorithm == "auto":
        algorithm = "pairwise" if 2 * n <= k else "gram"
    if algorithm == "gram":
        return _loss_from_c(acc(na.T @ nb) / n, lambda_param)
    if algorithm == "pairwise":
        frob = (acc(na @ na.T) * acc(nb @ nb.T)).sum() / (n * n)
        diag = (acc(na) * acc(nb)).sum(dim=0) / n
        return _loss_from_diag(frob, diag, lambda_param)
    raise ValueError(f"algorithm must be 'auto', 'pairwise' or 'gram', got {algorithm!r}")


# --------------------------------------------------------------------------- distributed (docs/math.md §7)
def _barlow_twins_distributed(z_a, z_b, lambda_param, op=None):
    """lightly's ``gather_distributed=True``: every rank standardises its *own* batch and
    forms its ``C_r = Ẑa_rᵀ Ẑb_r / N_r``; the loss is that of the rank average
    ``C = (1/W) Σ_r C_r`` (the same value on every rank).  The all-reduce's backward sums
    the ranks' gradients, so DDP's average applies ``∇L(C)`` exactly (lightly #1977).
    ``op``: the Triton op module forms ``Ẑa_rᵀ Ẑb_r`` (and its backward); the k×k loss of
    ``C`` is eager either way."""
    n = z_a.shape[0]
    if op is None:
        cross = acc(barlow_twins_standardize(z_a).T @ barlow_twins_standardize(z_b))
    else:
        cross = op.cross_correlation(z_a, z_b)
    c = D.all_reduce_sum(cross / (n * D.world_size()))
    return _loss_from_c(c, lambda_param)


# --------------------------------------------------------------------------- functional
def _check_dist_available(gather_distributed: bool) -> None:
    if gather_distributed and not D._AVAILABLE:
        raise ValueError("gather_distributed=True needs torch.distributed, which this torch "
                         "build does not provide; set gather_distributed=False")


def barlow_twins_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    lambda_param: float = 5e-3,
    gather_distributed: bool = False,
    algorithm: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """Barlow Twins loss of (N, k) projections ``z_a``, ``z_b`` (docs/math.md §7); N >= 2.

    ``L = Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²`` with ``C = Ẑaᵀ Ẑb / N`` and ``Ẑ`` the
    per-column batch standardisation ``(z - mean) / sqrt(var + 1e-5)`` (biased variance).
    ``algorithm``: ``"gram"`` (k×k ``C``), ``"pairwise"`` (N×N Grams) or ``"auto"``;
    both exact.  ``gather_distributed=True`` in a process group of W > 1 ranks: the loss of
    the rank-averaged ``C`` (each rank standardises its own batch), as lightly; a no-op
    otherwise.  Returns float32 (float64 for float64 inputs).
    """
    choice = requested_backend(backend)
    lambda_param = check_nonnegative("lambda_param", lambda_param)
    check_choice("algorithm", algorithm, ALGORITHMS)
    _check_dist_available(bool(gather_distributed))
    gather = bool(gather_distributed) and D.is_distributed()
    check_pair("z_a", z_a, "z_b", z_b, min_batch=2)
    return _barlow_twins(z_a, z_b, lambda_param, algorithm, choice, gather)


def _barlow_twins(z_a, z_b, lambda_param: float, algorithm: str, choice: str, gather: bool):
    """Checked arguments; ``gather``: a process group of W > 1 ranks is active."""
    op = select(choice, "barlow_twins", z_a)
    if gather:
        return _barlow_twins_distributed(z_a, z_b, lambda_param, op)
    if op is None:
        return barlow_twins_loss_reference(z_a, z_b, lambda_param, algorithm)
    return op.barlow_twins_loss(z_a, z_b, lambda_param, algorithm)


# --------------------------------------------------------------------------- module
class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss (Zbontar et al. 2021), docs/math.md §7; a drop-in for
    ``lightly.loss.BarlowTwinsLoss``.

    Args:
        lambda_param: weight of the redundancy-reduction (off-diagonal) term (default 5e-3).
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, the loss of the
            rank-averaged cross-correlation matrix (all-reduce of the k×k ``C``; each rank
            standardises its own batch), equal on every rank; DDP's gradient averaging then
            applies exactly the gradient of that loss (lightly's semantics; default False, a
            no-op when not distributed).  The kernels form each rank's ``C``; the loss of the
            all-reduced ``C`` (k×k) is eager.
        algorithm: ``"auto"`` | ``"pairwise"`` (N×N Grams) | ``"gram"`` (the k×k ``C``).
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env
            ``MINC_KERNELS_BACKEND``, read here, or ``"auto"``).

    ``forward(z_a, z_b)``: two (N, k) projections of one dtype, N >= 2; returns a scalar
    (float32; float64 for float64 inputs).
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False, *,
                 algorithm: str = "auto", backend: str | None = None):
        super().__init__()
        self.lambda_param = check_nonnegative("lambda_param", lambda_param)
        self.gather_distributed = bool(gather_distributed)
        _check_dist_available(self.gather_distributed)
        self.algorithm = check_choice("algorithm", algorithm, ALGORITHMS)
        self.backend = backend
        self._choice = requested_backend(backend)
        preload("barlow_twins", self._choice)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        gather = self.gather_distributed and D.is_distributed()
        check_pair("z_a", z_a, "z_b", z_b, min_batch=2)
        return _barlow_twins(z_a, z_b, self.lambda_param, self.algorithm, self._choice, gather)

    def extra_repr(self) -> str:
        s = f"lambda_param={self.lambda_param}, algorithm={self.algorithm!r}, backend={self.backend!r}"
        if self.gather_distributed:
            s += ", gather_distributed=True"
        return s


# --------------------------------------------------------------------------- registry entry
def _step(z_a, z_b, backend=None, **variant):
    return barlow_twins_loss(z_a, z_b, backend=backend, **variant)


def _flops(b: int, k: int) -> tuple[float, float]:
    # pairwise: Ẑa Ẑaᵀ, Ẑb Ẑbᵀ (fwd), two (N×N)·(N×k) products (bwd);
    # gram: Ẑaᵀ Ẑb (fwd), Ẑb Γᵀ and Ẑa Γ (bwd)
    pairwise = (4.0 * b * b * k, 4.0 * b * b * k)
    gram = (2.0 * b * k * k, 4.0 * b * k * k)
    return min(pairwise, gram, key=sum)


SPEC = LossSpec(
    name="barlow_twins", module=BarlowTwinsLoss, functional=barlow_twins_loss,
    reference=barlow_twins_loss_reference, step=_step, arg_names=("z_a", "z_b"),
    grad_args=(0, 1), op="barlow_twins", matmul_flops=_flops,
    variants={"pairwise": {"algorithm": "pairwise"}, "gram": {"algorithm": "gram"}},
)
