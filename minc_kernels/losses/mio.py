"""MIO binary-contrastive mutual-information loss (Manna et al. 2021), docs/math.md §3: the
module, the functional form, the dispatch (Triton op, the blocked CPU op, eager math,
distributed composition) and the eager math every fast path is checked against.
Kernels: :mod:`minc_kernels.ops.mio`; the CPU op without a 2B×2B matrix:
:mod:`minc_kernels.ops.mio_cpu`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from .._backend import functorch_active, preload, requested_backend, select
from .._validation import check_nonnegative, check_pair, check_positive
from ..ops.mio_cpu import mio_loss_blocked  # plain torch (no Triton): imported eagerly, Dynamo-traceable
from ._common import CheckedHyperParams, LossSpec, acc, normalize_rows

__all__ = ["MIOLoss", "mio_loss", "mio_loss_reference", "SPEC"]


# --------------------------------------------------------------------------- eager math
def mio_loss_reference(
    z1: torch.Tensor,
    z2: torch.Tensor,
    pos_temperature: float = 0.5,
    neg_temperature: float = 0.5,
    lambda_l2: float = 1.0,
) -> torch.Tensor:
    """The eager oracle, any B >= 2, float32 scalar (float64 for float64 inputs).

    ``Z = [ẑ1; ẑ2]``, ``S = Z Zᵀ``; ``mean_pos softplus(-S/τp) + mean_neg softplus(S/τn)``
    (positives (i, i±B), negatives every other off-diagonal entry) ``+ λ·mse(ẑ1, ẑ2)``.
    Materialises the 2B×2B matrix, as the authors' code does.
    """
    b = z1.shape[0]
    n = 2 * b
    zh1 = normalize_rows(z1)
    zh2 = normalize_rows(z2)
    z = torch.cat([zh1, zh2], dim=0)
    s = acc(z @ z.T)
    idx = torch.arange(n, device=z.device)
    partner = (idx + b) % n
    # Masks by torch.where, not boolean indexing: indexing needs the mask's values on the
    # host (nonzero), which meta/fake tensors and torch.compile cannot provide.
    pos = idx[None, :] == partner[:, None]
    neg = ~pos & (idx[None, :] != idx[:, None])
    zero = s.new_zeros(())
    l_pos = torch.where(pos, F.softplus(-s / pos_temperature), zero).sum() / n
    l_neg = torch.where(neg, F.softplus(s / neg_temperature), zero).sum() / (n * (n - 2))
    reg = F.mse_loss(acc(zh1), acc(zh2))
    return l_pos + l_neg + lambda_l2 * reg


# --------------------------------------------------------------------------- functional
def check_config(choice: str, gather_distributed: bool) -> None:
    if choice == "triton" and gather_distributed:
        raise ValueError("backend='triton' cannot be honoured with gather_distributed=True: the "
                         "distributed MIO loss (local rows x gathered columns) is composed in "
                         "eager PyTorch; use backend='auto' or 'reference'")


def mio_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    pos_temperature: float = 0.5,
    neg_temperature: float = 0.5,
    lambda_l2: float = 1.0,
    backend: str | None = None,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """MIO binary contrastive loss of (B, k) views (docs/math.md §3); any B >= 2.

    ``mean_pos softplus(-S/τp) + mean_neg softplus(S/τn) + λ·mse(ẑ1, ẑ2)`` over
    ``S = Z Zᵀ`` of the normalised, stacked views (2B rows).

    ``gather_distributed=True`` (docs/math.md §5), inside a process group of W > 1 ranks:
    the loss of the *global* batch (B = Σ_r B_r, all pairs across ranks), the same value on
    every rank; each rank evaluates its 2B_r local rows against the 2B gathered columns
    and the three partial sums are all-reduced, so DDP's averaging applies exactly the
    single-process gradient.  Composed in eager PyTorch: an explicit ``backend="triton"``
    is refused.  A no-op when not distributed.
    """
    choice = requested_backend(backend)
    gather = bool(gather_distributed) and D.is_distributed()
    check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
    pos_temperature = check_positive("pos_temperature", pos_temperature)
    neg_temperature = check_positive("neg_temperature", neg_temperature)
    lambda_l2 = check_nonnegative("lambda_l2", lambda_l2)
    check_config(choice, bool(gather_distributed))
    return _mio(z1, z2, pos_temperature, neg_temperature, lambda_l2, choice, gather)


def _mio(z1, z2, pos_temperature: float, neg_temperature: float, lambda_l2: float,
         choice: str, gather: bool) -> torch.Tensor:
    """Checked arguments; ``gather``: a process group of W > 1 ranks is active."""
    if gather:
        return _mio_distributed(z1, z2, pos_temperature, neg_temperature, lambda_l2)
    op = select(choice, "mio", z1)
    if op is None:
        # No Triton kernel here (CPU, or no Triton): "auto" runs the blocked path, which
        # streams row strips of S and never holds the 2B x 2B matrix (ops/mio_cpu.py).
        # float64 is the oracle/debug dtype and "reference" the oracle itself: both keep the
        # plain reference (it also supports double backward, the blocked op does not).
        # torch.func transforms cannot run the blocked op's torch.library autograd either.
        if choice == "reference" or z1.dtype == torch.float64 or functorch_active():
            return mio_loss_reference(z1, z2, pos_temperature, neg_temperature, lambda_l2)
        return mio_loss_blocked(z1, z2, pos_temperature, neg_temperature, lambda_l2)
    return op.mio_loss(z1, z2, pos_temperature, neg_temperature, lambda_l2)


# --------------------------------------------------------------------------- distributed (docs/math.md §5)
def _mio_distributed(z1, z2, pos_temperature, neg_temperature, lambda_l2):
    """Global-batch MIO loss: local rows × gathered columns, partial sums all-reduced."""
    b_local, k = z1.shape
    sizes = D.gather_sizes(b_local, z1.device)
    b = sum(sizes)
    n = 2 * b
    offset = sum(sizes[: D.rank()])
    zh1 = normalize_rows(z1)
    zh2 = normalize_rows(z2)
    rows = torch.cat([zh1, zh2], dim=0)                                 # (2B_r, k), local
    gathered = D.all_gather(torch.cat([zh1, zh2], dim=1), sizes=sizes)  # (B, 2k), global
    cols = torch.cat([gathered[:, :k], gathered[:, k:]], dim=0)         # (2B, k) = [ẑ1; ẑ2]
    s = acc(rows @ cols.T)                                              # (2B_r, 2B)
    local = torch.arange(b_local, device=z1.device)
    own = torch.cat([offset + local, b + offset + local])               # global index of each row
    partner = (own + b) % n
    cols_idx = torch.arange(n, device=z1.device)
    # torch.where masks, not boolean indexing (which needs the mask's values on the host).
    pos = cols_idx[None, :] == partner[:, None]
    neg = ~pos & (cols_idx[None, :] != own[:, None])
    zero = s.new_zeros(())
    sums = torch.stack([
        torch.where(pos, F.softplus(-s / pos_temperature), zero).sum(),
        torch.where(neg, F.softplus(s / neg_temperature), zero).sum(),
        (acc(zh1) - acc(zh2)).pow(2).sum(),
    ])
    red = D.all_reduce_sum(sums)
    return red[0] / n + red[1] / (n * (n - 2)) + lambda_l2 * red[2] / (b * k)


# --------------------------------------------------------------------------- module
class MIOLoss(CheckedHyperParams, nn.Module):
    """MIO binary contrastive mutual-information loss (Manna et al. 2021), docs/math.md §3.

    Args:
        pos_temperature: τp for the positive pairs (default 0.5).
        neg_temperature: τn for the negative pairs (default 0.5).
        lambda_l2: weight of the alignment term ``mse(ẑ1, ẑ2)`` (default 1.0).
        backend: as for :class:`~minc_kernels.SpectralContrastiveLoss`.
        gather_distributed: under ``torch.distributed`` with W > 1 ranks, the loss of the
            *global* batch: each rank's rows against the features gathered from all ranks
            (B = Σ_r B_r in every mean); the returned value is the global loss, equal on
            every rank, and DDP's averaging applies exactly the single-process gradient
            (default False; a no-op when not distributed).  Composed in eager PyTorch, so
            refused with ``backend="triton"``.
        temperature: one value for both τp and τn (as lightly's ``NTXentLoss(temperature=)``);
            combining it with a different explicit ``pos_temperature``/``neg_temperature``
            is an error.

    ``forward(z1, z2)``: two (B, k) views, any B >= 2; returns a scalar (float32; float64
    for float64 inputs).
    """

    _hparam_checks = {  # run on every assignment, here and after construction
        "pos_temperature": lambda v: check_positive("pos_temperature", v),
        "neg_temperature": lambda v: check_positive("neg_temperature", v),
        "lambda_l2": lambda v: check_nonnegative("lambda_l2", v),
        "gather_distributed": bool,
    }

    def __init__(self, pos_temperature: float | None = None, neg_temperature: float | None = None,
                 lambda_l2: float = 1.0, backend: str | None = None,
                 gather_distributed: bool = False, *, temperature: float | None = None):
        super().__init__()
        if temperature is not None:
            temperature = check_positive("temperature", temperature)
            for name, value in (("pos_temperature", pos_temperature),
                                ("neg_temperature", neg_temperature)):
                if value is not None and check_positive(name, value) != temperature:
                    raise ValueError(f"temperature={temperature} sets both temperatures, but "
                                     f"{name}={value} was also given; pass one or the other")
            pos_temperature = neg_temperature = temperature
        self.pos_temperature = 0.5 if pos_temperature is None else pos_temperature
        self.neg_temperature = 0.5 if neg_temperature is None else neg_temperature
        self.lambda_l2 = lambda_l2
        self.backend = backend  # also sets self._choice
        self.gather_distributed = gather_distributed
        check_config(self._choice, self.gather_distributed)
        preload("mio", self._choice)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        gather = self.gather_distributed and D.is_distributed()
        check_pair("z1", z1, "z2", z2, min_batch=1 if gather else 2)
        return _mio(z1, z2, self.pos_temperature, self.neg_temperature, self.lambda_l2,
                    self._choice, gather)

    def extra_repr(self) -> str:
        s = (f"pos_temperature={self.pos_temperature}, neg_temperature={self.neg_temperature}, "
             f"lambda_l2={self.lambda_l2}, backend={self.backend!r}")
        if self.gather_distributed:
            s += ", gather_distributed=True"
        return s


# --------------------------------------------------------------------------- registry entry
def _step(z1, z2, backend=None, **variant):
    return mio_loss(z1, z2, backend=backend, **variant)


SPEC = LossSpec(
    name="mio", module=MIOLoss, functional=mio_loss, reference=mio_loss_reference, step=_step,
    arg_names=("z1", "z2"), grad_args=(0, 1), op="mio",
    # S = Z Zᵀ with 2B rows; bwd dZ = 2 G Z
    matmul_flops=lambda b, k: (8.0 * b * b * k, 8.0 * b * b * k),
    cpu_fallback="blocked path (ops/mio_cpu: no 2Bx2B matrix; float64: reference)",
)
