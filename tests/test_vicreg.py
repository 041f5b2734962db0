"""VICReg (minc_kernels/losses/vicreg.py, docs/math.md §8) against lightly's
``VICRegLoss``, the oracle: values and gradients in float64 to 1e-12 relative, on the
eager math here and on the Triton kernels (interpreter on the CPU) below."""
import inspect

import pytest
import torch

import minc_kernels as mk
from minc_kernels import functional as Fn
from minc_kernels import reference
from minc_kernels.losses import REGISTRY

lightly_loss = pytest.importorskip("lightly.loss")

REL = 1e-12


def _views(b, k, dtype=torch.float64, seed=0, device="cpu"):
    """Correlated views with per-column scales and offsets (the standardisation matters)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, k, generator=g, dtype=torch.float64)
    scale = 0.3 + 2 * torch.rand(k, generator=g, dtype=torch.float64)
    shift = torch.randn(k, generator=g, dtype=torch.float64)
    # scales around 1: some columns' std above 1, some below (both sides of the hinge)
    za = base * scale + shift
    zb = (base + 0.7 * torch.randn(b, k, generator=g, dtype=torch.float64)) * scale - shift
    return (za.to(device=device, dtype=dtype).requires_grad_(),
            zb.to(device=device, dtype=dtype).requires_grad_())


def _value_and_grads(fn, za, zb, g=1.3):
    loss = fn(za, zb)
    ga, gb = torch.autograd.grad(loss * g, (za, zb))
    return loss.detach(), ga, gb


def _assert_rel(got, want, rel):
    for a, w in zip(got, want):
        scale = float(w.abs().max())
        assert float((a - w).abs().max()) <= rel * scale, (float((a - w).abs().max()), scale)


# ----------------------------------------------------------------------------- eager vs lightly
PARAMS = [dict(), dict(lambda_param=1.0, mu_param=0.5, nu_param=3.0, eps=1e-2),
          dict(lambda_param=0.0, mu_param=0.0, nu_param=1.0, eps=0.0)]


@pytest.mark.parametrize("b,k", [(2, 3), (7, 5), (16, 40), (40, 6)])
@pytest.mark.parametrize("algorithm", ["auto", "pairwise", "gram"])
@pytest.mark.parametrize("kw", PARAMS)
def test_reference_matches_lightly_float64(b, k, algorithm, kw):
    za, zb = _views(b, k, seed=b * 100 + k)
    want = _value_and_grads(lightly_loss.VICRegLoss(**kw), za, zb)
    got = _value_and_grads(mk.VICRegLoss(**kw, algorithm=algorithm, backend="reference"), za, zb)
    _assert_rel(got, want, REL)
    fn = _value_and_grads(lambda a, c: Fn.vicreg_loss(a, c, **kw, algorithm=algorithm,
                                                      backend="reference"), za, zb)
    _assert_rel(fn, want, REL)


def test_test_views_cross_the_variance_hinge():
    za, _ = _views(40, 6, seed=4006)
    std = za.detach().var(dim=0).add(1e-4).sqrt()
    assert bool((std < 1).any()) and bool((std > 1).any())


def test_constructor_matches_lightly_signature():
    ours = inspect.signature(mk.VICRegLoss.__init__).parameters
    theirs = inspect.signature(lightly_loss.VICRegLoss.__init__).parameters
    for name, p in theirs.items():
        assert name in ours and ours[name].default == p.default, name
    assert list(ours)[:len(theirs)] == list(theirs)  # same positional order
    m = mk.VICRegLoss()
    assert (m.lambda_param, m.mu_param, m.nu_param, m.eps) == (25.0, 25.0, 1.0, 1e-4)
    assert m.gather_distributed is False


def test_gradcheck_eager_math():
    for algorithm in ("pairwise", "gram"):
        za, zb = _views(5, 4, seed=3)
        fn = lambda a, c: reference.vicreg_loss(a, c, 2.0, 3.0, 0.5, 1e-3, algorithm)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (za, zb))
        assert torch.autograd.gradgradcheck(fn, (za, zb))


def test_float32_and_half_return_float32():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        za, zb = _views(8, 6, dtype)
        loss = mk.VICRegLoss(backend="reference")(za, zb)
        assert loss.dtype == torch.float32 and loss.shape == ()
        ga, = torch.autograd.grad(loss, za)
        assert ga.dtype == dtype


def test_torch_compile_fullgraph_module():
    za, zb = _views(9, 7, torch.float32, seed=4)
    m = mk.VICRegLoss(backend="reference")
    torch._dynamo.reset()
    got = _value_and_grads(torch.compile(m, fullgraph=True, backend="eager"), za, zb)
    want = _value_and_grads(m, za, zb)
    _assert_rel(got, want, 1e-6)


def test_training_step_has_no_host_sync():
    from test_sync_free import NoHostReads

    za, zb = _views(6, 5, torch.float32, seed=5)
    m = mk.VICRegLoss()
    with NoHostReads():
        loss = m(za, zb)
        loss.backward()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: mk.VICRegLoss()(torch.randn(1, 4), torch.randn(1, 4)), ValueError, "B >= 2"),
    (lambda: mk.VICRegLoss()(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "same shape"),
    (lambda: mk.VICRegLoss()(torch.randn(3, 4, 2), torch.randn(3, 4, 2)), ValueError, "2 dims"),
    (lambda: mk.VICRegLoss()(torch.randn(3, 4), torch.randn(3, 4).double()), TypeError, "dtype"),
    (lambda: mk.VICRegLoss(lambda_param=float("nan")), ValueError, "lambda_param"),
    (lambda: mk.VICRegLoss(mu_param=-1.0), ValueError, "mu_param"),
    (lambda: mk.VICRegLoss(nu_param=float("inf")), ValueError, "nu_param"),
    (lambda: mk.VICRegLoss(eps=-1e-4), ValueError, "eps"),
    (lambda: mk.VICRegLoss(eps="1e-4"), TypeError, "eps"),
    (lambda: mk.VICRegLoss(algorithm="kxk"), ValueError, "algorithm"),
    (lambda: mk.VICRegLoss(backend="cuda"), ValueError, "backend"),
    (lambda: Fn.vicreg_loss(torch.randn(3, 4), torch.randn(3, 4), nu_param=float("nan")),
     ValueError, "nu_param"),
])
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_gather_distributed_is_a_noop_without_process_group():
    za, zb = _views(6, 5, seed=6)
    a = mk.VICRegLoss(gather_distributed=True)(za, zb)
    b = mk.VICRegLoss()(za, zb)
    assert torch.equal(a, b)


def test_registry_entry():
    spec = REGISTRY["vicreg"]
    assert spec.module is mk.VICRegLoss and spec.functional is mk.vicreg_loss
    za, zb = _views(6, 5, torch.float32, seed=7)
    for variant in ({}, *spec.variants.values()):
        assert torch.allclose(spec.step(za, zb, backend="reference", **variant),
                              spec.reference(za, zb), rtol=1e-5)
    fwd, bwd = spec.matmul_flops(256, 8192)
    assert fwd > 0 and bwd > 0
