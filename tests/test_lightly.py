"""Drop-in test with the real ``lightly`` package (issue 12): lightly's BYOL building blocks and
recipe (heads, ``update_momentum`` with ``cosine_schedule(step, steps, 0.996, 1)``, SGD lr 0.06,
the symmetric call ``0.5 * (criterion(p0, z1) + criterion(p1, z0))``), with only the criterion
swapped to the default ``minc_kernels.MINCLoss()``.  Small CPU images, a few dozen steps.

Skipped where lightly is not installed (the ``test`` extra installs it).
"""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import minc_kernels as mk

heads = pytest.importorskip("lightly.models.modules.heads")
lightly_utils = pytest.importorskip("lightly.models.utils")
scheduler = pytest.importorskip("lightly.utils.scheduler")

STEPS = 40
BATCH = 64
SIZE = 16
WINDOW = 8  # loss averaged over the first / last WINDOW steps: single steps are noisy


def _images(n, seed):
    """Random-but-structured 16x16 greyscale images: 8 smooth random patterns ("classes"),
    each drawn with a random contrast, offset and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.randn(8, 1, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear",
                           align_corners=False)
    cls = torch.randint(0, 8, (n,), generator=g)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    offset = 0.2 * torch.randn(n, 1, 1, 1, generator=g)
    return protos[cls] * contrast + offset + 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=g)


def _view(x, g):
    """A random crop (pad 2, crop 16), a horizontal flip and noise: one augmented view."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    i, j = torch.randint(0, 5, (2,), generator=g).tolist()
    v = padded[:, :, i:i + SIZE, j:j + SIZE]
    flip = torch.rand(n, generator=g) < 0.5
    v = torch.where(flip.view(n, 1, 1, 1), v.flip(3), v)
    return v + 0.05 * torch.randn(v.shape, generator=g)


def _backbone():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )


def _byol_losses(criterion, sgd_momentum, seed=0, one_call=False):
    """lightly's BYOL example loop at small scale; returns the per-step losses.  ``one_call``:
    the symmetric loss as one call ``0.5 * criterion((p0, p1), (z1, z0))`` (one update of
    MINC's M per step, the README's form) instead of lightly's two calls.  Raises
    (ValueError from MINCLoss refusing a non-finite target, or FloatingPointError) on divergence."""
    torch.manual_seed(seed)
    backbone = _backbone()
    projection_head = heads.BYOLProjectionHead(64, 256, 64)
    prediction_head = heads.BYOLPredictionHead(64, 256, 64)
    backbone_momentum = copy.deepcopy(backbone)
    projection_head_momentum = copy.deepcopy(projection_head)
    lightly_utils.deactivate_requires_grad(backbone_momentum)
    lightly_utils.deactivate_requires_grad(projection_head_momentum)
    params = [*backbone.parameters(), *projection_head.parameters(), *prediction_head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.06, momentum=sgd_momentum)
    data = _images(512, seed)
    g = torch.Generator().manual_seed(seed + 1)

    def online(x):
        return prediction_head(projection_head(backbone(x).flatten(start_dim=1)))

    def momentum_branch(x):
        with torch.no_grad():
            return projection_head_momentum(backbone_momentum(x).flatten(start_dim=1)).detach()

    losses = []
    for step in range(STEPS):
        x = data[torch.randint(0, data.shape[0], (BATCH,), generator=g)]
        x0, x1 = _view(x, g), _view(x, g)
        m = scheduler.cosine_schedule(step, STEPS, 0.996, 1)
        lightly_utils.update_momentum(backbone, backbone_momentum, m=m)
        lightly_utils.update_momentum(projection_head, projection_head_momentum, m=m)
        p0, p1 = online(x0), online(x1)
        z0, z1 = momentum_branch(x0), momentum_branch(x1)
        if one_call:
            loss = 0.5 * criterion((p0, p1), (z1, z0))
        else:
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        val = float(loss.detach())  # a test, not a hot path
        if not math.isfinite(val):
            raise FloatingPointError(f"loss {val} at step {step}")
        losses.append(val)
    return losses


def _went_down(losses):
    first = sum(losses[:WINDOW]) / WINDOW
    last = sum(losses[-WINDOW:]) / WINDOW
    return first, last


# lightly's BYOL example uses plain SGD(lr=0.06); momentum 0.9 is the harsher common variant.
@pytest.mark.parametrize("sgd_momentum", [0.0, 0.9])
def test_default_minc_trains_in_lightly_byol_recipe(sgd_momentum):
    losses = _byol_losses(mk.MINCLoss(), sgd_momentum)
    first, last = _went_down(losses)
    assert all(math.isfinite(v) for v in losses)
    assert last < first - 0.05, (first, last, losses)


def test_default_minc_one_call_symmetric_form_trains():
    """The README's form: one call per step, so M gets one EMA update per optimiser step."""
    criterion = mk.MINCLoss()
    losses = _byol_losses(criterion, 0.0, one_call=True)
    first, last = _went_down(losses)
    assert last < first - 0.05, (first, last, losses)
    assert int(criterion.num_updates) == STEPS


def test_negative_cosine_control_trains_in_the_same_loop():
    """The same loop with lightly's own criterion: the harness itself is sound."""
    from lightly.loss import NegativeCosineSimilarity
    first, last = _went_down(_byol_losses(NegativeCosineSimilarity(), 0.9))
    assert last < first - 0.05, (first, last)


def test_raw_form_diverges_in_the_same_loop():
    """The evidence that the default matters: the raw form (``feature_norm="none"``) blows up
    within a few steps of this loop (NaN loss at step 5 when measured), so a harness change that
    let it pass would no longer test the drop-in."""
    with pytest.raises((FloatingPointError, ValueError)):
        _byol_losses(mk.MINCLoss(feature_norm="none"), 0.0)

