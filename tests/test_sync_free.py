"""The default training step never waits on the device (issue 13): no ``.item()``,
``bool(tensor)`` or value-dependent branch in the loss forward/backward, ``ema_update_`` or
``MomentumEncoder.update``.  On the CPU a ``TorchDispatchMode`` sees every aten call, so a
step that reads a tensor's value on the host (``aten._local_scalar_dense``, which ``.item()``
and ``bool()`` lower to, or ``aten.is_nonzero``/``aten.item``) fails here; on a GPU the same
step also runs under ``torch.cuda.set_sync_debug_mode("error")``."""
import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import minc_kernels as mk

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.item.default}


class NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"host sync on the training path: {func}")
        return func(*args, **(kwargs or {}))


def test_the_mode_catches_a_host_read():
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="host sync"), NoHostReads():
        bool(x.sum() > 0)
    with pytest.raises(AssertionError, match="host sync"), NoHostReads():
        x.sum().item()


def _net(k):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, k))


def _no_sync(device):
    if device.type == "cuda":
        return _cuda_sync_error()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _cuda_sync_error():
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_default_minc_training_step_has_no_host_sync(device, symmetric):
    device = torch.device(device)
    k = 8
    online = _net(k).to(device)
    predictor = nn.Linear(k, k).to(device)
    target = mk.MomentumEncoder(online)
    loss_fn = mk.MINCLoss()  # every default: lazy dim, feature_norm, check_finite="skip"
    opt = torch.optim.SGD([*online.parameters(), *predictor.parameters()], lr=0.05)
    for step in range(3):
        x1, x2 = torch.randn(10, 12, device=device), torch.randn(10, 12, device=device)
        if step == 2:
            x2[0, 0] = float("nan")  # a non-finite target batch: skipped on the device
        with NoHostReads(), _no_sync(device):
            p1, p2 = predictor(online(x1)), predictor(online(x2))
            t1, t2 = target(x1), target(x2)
            if symmetric:
                loss = loss_fn((p1, p2), (t2, t1))
            else:
                loss = 0.5 * (loss_fn(p1, t2) + loss_fn(p2, t1))
            opt.zero_grad()
            loss.backward()
            target.update(mk.cosine_momentum(step, 3))
            mk.ema_update_(list(target.target.parameters()), list(online.parameters()), 0.99)
        if step == 2:
            assert loss_fn.nonfinite_skips.item() >= 1
        opt.step()
    assert torch.isfinite(loss_fn.moment).all()


_PAIR_LOSSES = {
    "spectral": lambda: mk.SpectralContrastiveLoss(),
    "mio": lambda: mk.MIOLoss(),
    **{f"{name}-{algo}": (lambda cls=cls, algo=algo: cls(algorithm=algo))
       for name, cls in (("barlow_twins", mk.BarlowTwinsLoss), ("vicreg", mk.VICRegLoss))
       for algo in ("auto", "pairwise", "gram")},
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(_PAIR_LOSSES))
def test_pair_losses_have_no_host_sync(name, device):
    """Default backend: the eager math on the CPU, the Triton ops on CUDA (there also under
    ``torch.cuda.set_sync_debug_mode("error")``)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(5)
    z1 = (torch.randn(9, 5, generator=g) * 2 + 1).to(device).requires_grad_()
    z2 = (torch.randn(9, 5, generator=g) * 2 - 1).to(device).requires_grad_()
    loss_fn = _PAIR_LOSSES[name]()
    with NoHostReads(), _no_sync(device):
        loss_fn(z1, z2).backward()
