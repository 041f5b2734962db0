"""VICReg loss (Bardes et al. 2022), docs/math.md §8: the module, the functional form, the
dispatch (Triton op, eager math, distributed composition) and the eager math every fast path
is checked against.  A drop-in for ``lightly.loss.VICRegLoss`` (on (N, k) projections, and
(N, ..., k) ones as lightly accepts them): same
constructor names and defaults, same formula (unbiased variance, ``eps`` inside the square
root, covariance ``/ (N-1)`` and ``/ k``), same ``gather_distributed`` semantics.
Kernels: :mod:`minc_kernels.ops.vicreg`.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as D
from .._backend import preload, requested_backend, select
from .._validation import check_choice, check_nonnegative, check_pair
from ._common import LossSpec, acc

__all__ = ["VICRegLoss", "vicreg_loss", "vicreg_loss_reference", "vicreg_invariance",
           "vicreg_variance", "vicreg_covariance", "ALGORITHMS", "SPEC"]

ALGORITHMS = ("auto", "pairwise", "gram")


# --------------------------------------------------------------------------- eager math
def vicreg_invariance(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """``(1/(N k)) Σ (z_a - z_b)²`` (``F.mse_loss``), in the accumulation dtype."""
    return (acc(z_a) - acc(z_b)).pow(2).mean()


def _centered(z: torch.Tensor):
    """``(z - mean)`` in the accumulation dtype and the unbiased column variance."""
    za = acc(z)
    zc = za - za.mean(dim=0)
    return zc, zc.pow(2).sum(dim=0) / (z.shape[0] - 1)


def vicreg_variance(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``(1/k) Σ_i relu(1 - sqrt(var_i + eps))`` of the unbiased column variances ``var``."""
    return torch.relu(1.0 - torch.sqrt(var + eps)).mean()


def vicreg_covariance(zc: torch.Tensor, dtype: torch.dtype, algorithm: str) -> torch.Tensor:
    """``(1/k) Σ_{i≠j} Cov_ij²`` with ``Cov = Zcᵀ Zc / (N-1)`` of the centred ``zc``
    (rounded to ``dtype`` for the products).  ``"gram"``: the k×k ``Zcᵀ Zc``;
    ``"pairwise"``: ``‖Zcᵀ Zc‖_F² = ‖Zc Zcᵀ‖_F²`` (N×N), diagonal ``Σ_n zc_ni²``."""
    n, k = zc.shape
    xc = zc.to(dtype)
    if algorithm == "gram":
        g = acc(xc.T @ xc)
        off = g.pow(2).sum() - torch.diagonal(g).pow(2).sum()
    elif algorithm == "pairwise":
        h = acc(xc @ xc.T)
        off = h.pow(2).sum() - acc(xc).pow(2).sum(dim=0).pow(2).sum()
    else:
        raise ValueError(f"algorithm must be 'auto', 'pairwise' or 'gram', got {algorithm!r}")
    return off / ((n - 1) ** 2 * k)


def _var_cov(z_a, z_b, mu_param, nu_param, eps, algorithm):
    """``μ·(v(z_a) + v(z_b))/2 + ν·(c(z_a) + c(z_b))``."""
    n, k = z_a.shape
    if algorithm == "auto":
        algorithm = "pairwise" if n <= k else "gram"  # 2N²k against 2Nk² flops per view
    zca, var_a = _centered(z_a)
    zcb, var_b = _centered(z_b)
    var_loss = 0.5 * (vicreg_variance(var_a, eps) + vicreg_variance(var_b, eps))
    cov_loss = (vicreg_covariance(zca, z_a.dtype, algorithm)
                + vicreg_covariance(zcb, z_b.dtype, algorithm))
    return mu_param * var_loss + nu_param * cov_loss


def vicreg_loss_reference(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float = 25.0,
                          mu_param: float = 25.0, nu_param: float = 1.0, eps: float = 1e-4,
                          algorithm: str = "auto") -> torch.Tensor:
    """The eager oracle, float32 scalar (float64 for float64 inputs).

    ``L = λ·mse(z_a, z_b) + μ·(v(z_a) + v(z_b))/2 + ν·(c(z_a) + c(z_b))`` with
    ``v(z) = (1/k) Σ_i relu(1 - sqrt(Var_i + eps))`` (unbiased ``Var``) and
    ``c(z) = (1/k) Σ_{i≠j} Cov_ij²``, ``Cov = (z - mean)ᵀ (z - mean) / (N-1)``.
    ``algorithm``: ``"gram"`` (k×k covariance), ``"pairwise"`` (N×N Gram of the centred
    rows) or ``"auto"`` (the fewer flops: ``N <= k`` pairwise); both exact.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be 'auto', 'pairwise' or 'gram', got {algorithm!r}")
    return (lambda_param * vicreg_invariance(z_a, z_b)
            + _var_cov(z_a, z_b, mu_param, nu_param, eps, algorithm))


# --------------------------------------------------------------------------- functional
def _check_dist_available(gather_distributed: bool) -> None:
    if gather_distributed and not D._AVAILABLE:
        raise ValueError("gather_distributed=True needs torch.distributed, which this torch "
                         "build does not provide; set gather_distributed=False")


def check_views(z_a, z_b) -> None:
    """(N, k) views, or (N, ..., k) as lightly accepts (the variance and covariance terms
    then average over the middle positions); N >= 2, one shape, dtype and device."""
    if isinstance(z_a, torch.Tensor) and isinstance(z_b, torch.Tensor) and z_a.dim() > 2:
        if z_a.shape != z_b.shape:
            raise ValueError(f"z_b must have the same shape as z_a: expected {tuple(z_a.shape)}, "
                             f"got {tuple(z_b.shape)}")
        if 0 in z_a.shape[1:-1]:
            raise ValueError(f"z_a must have non-empty middle dimensions, got shape "
                             f"{tuple(z_a.shape)}")
        # dtype, device, N >= 2 and k >= 1 on the first position's (N, k) slice (a view)
        check_pair("z_a", z_a.flatten(1, -2)[:, 0], "z_b", z_b.flatten(1, -2)[:, 0], min_batch=2)
        return
    check_pair("z_a", z_a, "z_b", z_b, min_batch=2)


def _check_params(lambda_param, mu_param, nu_param, eps):
    return (check_nonnegative("lambda_param", lambda_param),
            check_nonnegative("mu_param", mu_param),
            check_nonnegative("nu_param", nu_param),
            check_nonnegative("eps", eps))


def vicreg_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    gather_distributed: bool = False,
    eps: float = 1e-4,
    algorithm: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """VICReg loss of (N, k) projections ``z_a``, ``z_b`` (docs/math.md §8); N >= 2.
    (N, ..., k) projections: the mean over the middle positions of the (N, k) loss (lightly).

    ``L = λ·mse(z_a, z_b) + μ·(v(z_a) + v(z_b))/2 + ν·(c(z_a) + c(z_b))``, see
    :func:`vicreg_loss_reference`.  ``gather_distributed=True`` in a process group of W > 1
    ranks (lightly's semantics): the invariance term of the local batch, the variance and
    covariance terms of the all-gathered global batch; a no-op otherwise.
    Returns float32 (float64 for float64 inputs).
    """
    choice = requested_backend(backend)
    params = _check_params(lambda_param, mu_param, nu_param, eps)
    check_choice("algorithm", algorithm, ALGORITHMS)
    _check_dist_available(bool(gather_distributed))
    gather = bool(gather_distributed) and D.is_distributed()
    check_views(z_a, z_b)
    return _vicreg(z_a, z_b, *params, algorithm, choice, gather)


def _vicreg(z_a, z_b, lambda_param, mu_param, nu_param, eps, algorithm: str, choice: str,
            gather: bool):
    """Checked arguments; ``gather``: a process group of W > 1 ranks is active."""
    op = select(choice, "vicreg", z_a)
    if z_a.dim() > 2:
        return _vicreg_positions(z_a, z_b, lambda_param, mu_param, nu_param, eps, algorithm, op,
                                 gather)
    if gather:
        # lightly: invariance of the local pairs; variance/covariance of the gathered batch
        # (one all-gather of [z_a | z_b]; its backward is the reduce-scatter of the gradients).
        k = z_a.shape[1]
        zg = D.all_gather(torch.cat([z_a, z_b], dim=1))
        ga, gb = zg[:, :k].contiguous(), zg[:, k:].contiguous()
        inv = lambda_param * vicreg_invariance(z_a, z_b)
        if op is None:
            return inv + _var_cov(ga, gb, mu_param, nu_param, eps, algorithm)
        return inv + op.vicreg_loss(ga, gb, 0.0, mu_param, nu_param, eps, algorithm)
    if op is None:
        return vicreg_loss_reference(z_a, z_b, lambda_param, mu_param, nu_param, eps, algorithm)
    return op.vicreg_loss(z_a, z_b, lambda_param, mu_param, nu_param, eps, algorithm)


def _vicreg_positions(z_a, z_b, lambda_param, mu_param, nu_param, eps, algorithm, op, gather):
    """(N, ..., k) views, as lightly: the invariance is the MSE over every element, the
    variance hinge averages over positions and features, the covariance term is that of each
    position's (N, k) slice averaged over positions; so the loss is the mean over positions
    of the (N, k) loss.  One all-gather of every position when distributed."""
    n, k = z_a.shape[0], z_a.shape[-1]
    za, zb = z_a.reshape(n, -1, k), z_b.reshape(n, -1, k)
    inv = lambda_param * vicreg_invariance(za, zb)
    if gather:
        zg = D.all_gather(torch.cat([za, zb], dim=2))
        za, zb = zg[..., :k], zg[..., k:]
    terms = []
    for i in range(za.shape[1]):
        a, b = za[:, i], zb[:, i]
        terms.append(_var_cov(a, b, mu_param, nu_param, eps, algorithm) if op is None
                     else op.vicreg_loss(a, b, 0.0, mu_param, nu_param, eps, algorithm))
    return inv + torch.stack(terms).mean()


# --------------------------------------------------------------------------- module
class VICRegLoss(nn.Module):
    """VICReg loss (Bardes et al. 2022), docs/math.md §8; a drop-in for
    ``lightly.loss.VICRegLoss`` on (N, k) projections.

    Args:
        lambda_param: weight of the invariance (MSE) term (default 25.0).
        mu_param: weight of the variance hinge (default 25.0).
        nu_param: weight of the covariance term (default 1.0).
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, the variance and
            covariance terms of the all-gathered global batch, the invariance term of the
            local pairs (lightly's semantics; default False, a no-op when not distributed).
        eps: added to the variance under the square root (default 1e-4).
        algorithm: ``"auto"`` | ``"pairwise"`` (N×N Grams) | ``"gram"`` (k×k covariance).
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (default: env
            ``MINC_KERNELS_BACKEND``, read here, or ``"auto"``).

    ``forward(z_a, z_b)``: two (N, k) projections of one dtype, N >= 2, or (N, ..., k) as
    lightly accepts (the mean over the middle positions of the (N, k) loss; a loop over the
    positions); returns a scalar (float32; float64 for float64 inputs).
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0,
                 nu_param: float = 1.0, gather_distributed: bool = False, eps: float = 1e-4, *,
                 algorithm: str = "auto", backend: str | None = None):
        super().__init__()
        (self.lambda_param, self.mu_param, self.nu_param,
         self.eps) = _check_params(lambda_param, mu_param, nu_param, eps)
        self.gather_distributed = bool(gather_distributed)
        _check_dist_available(self.gather_distributed)
        self.algorithm = check_choice("algorithm", algorithm, ALGORITHMS)
        self.backend = backend
        self._choice = requested_backend(backend)
        preload("vicreg", self._choice)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        gather = self.gather_distributed and D.is_distributed()
        check_views(z_a, z_b)
        return _vicreg(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, self.eps,
                       self.algorithm, self._choice, gather)

    def extra_repr(self) -> str:
        s = (f"lambda_param={self.lambda_param}, mu_param={self.mu_param}, "
             f"nu_param={self.nu_param}, eps={self.eps}, algorithm={self.algorithm!r}, "
             f"backend={self.backend!r}")
        if self.gather_distributed:
            s += ", gather_distributed=True"
        return s


# --------------------------------------------------------------------------- registry entry
def _step(z_a, z_b, backend=None, **variant):
    return vicreg_loss(z_a, z_b, backend=backend, **variant)


def _flops(b: int, k: int) -> tuple[float, float]:
    # per view: pairwise Zc Zcᵀ (fwd) and (N×N)·(N×k) (bwd); gram Zcᵀ Zc (fwd), Zc Γ (bwd)
    pairwise = (4.0 * b * b * k, 4.0 * b * b * k)
    gram = (4.0 * b * k * k, 4.0 * b * k * k)
    return min(pairwise, gram, key=sum)


SPEC = LossSpec(
    name="vicreg", module=VICRegLoss, functional=vicreg_loss,
    reference=vicreg_loss_reference, step=_step, arg_names=("z_a", "z_b"),
    grad_args=(0, 1), op="vicreg", matmul_flops=_flops,
    variants={"pairwise": {"algorithm": "pairwise"}, "gram": {"algorithm": "gram"}},
)
