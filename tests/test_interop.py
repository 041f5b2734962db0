"""EMA interop with lightly and timm (issue 13): same numbers, and the conventions docs/interop.md states.

Skipped per library where it is not installed (the ``test`` extra installs both).
"""
import copy

import pytest
import torch
from torch import nn

import minc_kernels as mk

# fp32 agreement of one EMA update started from the same target (issue 13's bounds).  The
# backends round differently: lightly multiplies then adds (two roundings), ema_update_ and
# timm lerp (one); on weights of magnitude ~1 that is about one ulp (1.19e-7) per update.
LIGHTLY_TOL = 3.6e-7
TIMM_TOL = 1.2e-7
STEPS = 20


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8),
    )


def _trajectory(seed, steps=STEPS):
    """Yield (online, momentum) after each SGD step of a small net (BN stats move too)."""
    online = _net(seed)
    opt = torch.optim.SGD(online.parameters(), lr=0.06, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    for k in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=gen)
        loss = online(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield online, mk.cosine_momentum(k, steps, 0.99)


def _max_diff(xs, ys):
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(xs, ys))


@pytest.mark.parametrize("backend", ["auto", "foreach"])
def test_ema_update_matches_lightly_update_momentum(backend):
    lightly_utils = pytest.importorskip("lightly.models.utils")
    online = None
    ref = None
    worst_step = 0.0
    for online, m in _trajectory(0):
        if ref is None:
            ref = copy.deepcopy(online)  # both EMA copies start at the first online state
            ours = [p.detach().clone() for p in ref.parameters()]
        # Per update: both start from lightly's current target.
        start = [p.detach().clone() for p in ref.parameters()]
        lightly_utils.update_momentum(online, ref, m)
        mk.ema_update_(start, list(online.parameters()), m, backend=backend)
        worst_step = max(worst_step, _max_diff(ref.parameters(), start))
        # Independent trajectories, as a user switching from one to the other would see.
        mk.ema_update_(ours, list(online.parameters()), m, backend=backend)
    assert worst_step <= LIGHTLY_TOL, worst_step
    # EMA contracts earlier differences (m <= 1), so they can only add up step by step.
    assert _max_diff(ref.parameters(), ours) <= STEPS * LIGHTLY_TOL
    # And the EMA really moved (a test that would pass on a no-op is no test).
    assert _max_diff(ref.parameters(), online.parameters()) > 1e-3


@pytest.mark.parametrize("backend", ["auto", "foreach"])
def test_momentum_encoder_matches_timm_model_ema_v3(backend):
    model_ema = pytest.importorskip("timm.utils.model_ema")
    enc = timm_ema = None
    worst_step = 0.0
    for online, m in _trajectory(1):
        if enc is None:
            enc = mk.MomentumEncoder(online)  # EMAs floating buffers too, as ModelEmaV3 does
            timm_ema = model_ema.ModelEmaV3(online, decay=0.99)
        with torch.no_grad():  # per update: start from timm's current state
            for a, b in zip(enc.target.state_dict().values(), timm_ema.module.state_dict().values()):
                a.copy_(b)
        timm_ema.decay = m
        timm_ema.update(online)
        enc.update(m, backend=backend)
        ours, theirs = enc.target.state_dict(), timm_ema.module.state_dict()
        assert list(ours) == list(theirs)
        for name in ours:
            if not ours[name].is_floating_point():  # num_batches_tracked: copied by both
                assert torch.equal(ours[name], theirs[name]), name
        worst_step = max(worst_step, _max_diff(
            [v for v in ours.values() if v.is_floating_point()],
            [v for v in theirs.values() if v.is_floating_point()]))
    assert worst_step <= TIMM_TOL, worst_step


def test_cosine_momentum_vs_lightly_cosine_schedule():
    """cosine_momentum(k, K) divides by K; lightly's cosine_schedule(k, K) divides by K - 1."""
    scheduler = pytest.importorskip("lightly.utils.scheduler")
    K = 10
    ours = [mk.cosine_momentum(k, K, 0.996, 1.0) for k in range(K + 1)]
    shifted = [scheduler.cosine_schedule(k, K + 1, 0.996, 1.0) for k in range(K + 1)]
    assert ours == pytest.approx(shifted, abs=1e-15)
    same_k = [scheduler.cosine_schedule(k, K, 0.996, 1.0) for k in range(K)]
    assert ours[0] == same_k[0] == 0.996
    assert same_k[K - 1] == 1.0 and ours[K - 1] < 1.0  # lightly reaches 1 one step earlier


def test_buffer_and_mode_conventions():
    """MomentumEncoder EMAs BN running stats (lightly's update_momentum leaves them); timm's
    ModelEmaV3 keeps its copy in eval mode, MomentumEncoder keeps the online module's mode."""
    lightly_utils = pytest.importorskip("lightly.models.utils")
    model_ema = pytest.importorskip("timm.utils.model_ema")
    online = _net(2).train()
    enc = mk.MomentumEncoder(online)
    ref = copy.deepcopy(online)
    timm_ema = model_ema.ModelEmaV3(online, decay=0.5)
    assert enc.target.training and ref.training and not timm_ema.module.training
    before = ref[1].running_mean.clone()
    online(torch.randn(16, 3, 8, 8))  # moves the online BN running stats only
    assert not torch.equal(online[1].running_mean, before)
    lightly_utils.update_momentum(online, ref, 0.5)
    enc.update(0.5)
    assert torch.equal(ref[1].running_mean, before)
    torch.testing.assert_close(enc.target[1].running_mean,
                               0.5 * before + 0.5 * online[1].running_mean)
    assert torch.equal(enc.target[1].num_batches_tracked, online[1].num_batches_tracked)
