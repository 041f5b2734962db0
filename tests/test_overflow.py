"""Inputs whose squared row norms overflow float32 (entries near 1e20, issue 25): the
spectral and MIO losses give the float64 value on every path; MINC never takes such a batch
as a good moment update."""
import os

import pytest
import torch

import minc_kernels as mk
from minc_kernels import reference

SCALE = 1e20


def _views(b=8, k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, generator=g) * SCALE, torch.randn(b, k, generator=g) * SCALE)


def _paths():
    paths = ["reference", "auto"]
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        paths.append("triton")
    return paths


@pytest.mark.parametrize("backend", _paths())
@pytest.mark.parametrize("loss", ["spectral", "mio"])
def test_huge_rows_give_the_float64_value(loss, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    z1, z2 = _views()
    dev = torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")
    fn = {"spectral": mk.spectral_contrastive_loss, "mio": mk.mio_loss}[loss]
    want = {"spectral": reference.spectral_loss, "mio": reference.mio_loss}[loss](z1.double(), z2.double())
    a, b = z1.to(dev).requires_grad_(), z2.to(dev).requires_grad_()
    got = fn(a, b, backend=backend)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_minc_skips_and_counts_a_target_batch_whose_norms_overflow():
    loss = mk.MINCLoss(16)
    p, t = _views()
    loss(p / SCALE, t / SCALE)  # one good step
    before = loss.moment.clone()
    out = loss(p / SCALE, t)
    assert int(loss.num_updates) == 1 and int(loss.nonfinite_skips) == 1
    assert torch.equal(loss.moment, before)
    assert torch.isnan(out)  # not a silent value from zeroed rows
