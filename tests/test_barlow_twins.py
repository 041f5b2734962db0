"""Barlow Twins (minc_kernels/losses/barlow_twins.py, docs/math.md §7) against lightly's
``BarlowTwinsLoss``, the oracle: values and gradients in float64 to 1e-12 relative, on the
eager math here and on the Triton kernels (interpreter on the CPU) below."""
import inspect

import pytest
import torch

import minc_kernels as mk
from dist_helpers import free_port, spawn
from minc_kernels import functional as Fn
from minc_kernels import reference
from minc_kernels.losses import REGISTRY
from minc_kernels.losses import barlow_twins as home

lightly_loss = pytest.importorskip("lightly.loss")

REL = 1e-12


def _views(b, k, dtype=torch.float64, seed=0, device="cpu"):
    """Correlated views with per-column scales and offsets (the standardisation matters)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, k, generator=g, dtype=torch.float64)
    scale = 0.3 + 2 * torch.rand(k, generator=g, dtype=torch.float64)
    shift = torch.randn(k, generator=g, dtype=torch.float64)
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
@pytest.mark.parametrize("b,k", [(3, 3), (7, 5), (16, 40), (40, 6)])
@pytest.mark.parametrize("algorithm", ["auto", "pairwise", "gram"])
@pytest.mark.parametrize("lam", [5e-3, 0.0, 0.7])
def test_reference_matches_lightly_float64(b, k, algorithm, lam):
    za, zb = _views(b, k, seed=b * 100 + k)
    want = _value_and_grads(lightly_loss.BarlowTwinsLoss(lambda_param=lam), za, zb)
    got = _value_and_grads(mk.BarlowTwinsLoss(lam, algorithm=algorithm, backend="reference"),
                           za, zb)
    _assert_rel(got, want, REL)
    fn = _value_and_grads(lambda a, c: Fn.barlow_twins_loss(a, c, lam, algorithm=algorithm,
                                                            backend="reference"), za, zb)
    _assert_rel(fn, want, REL)


@pytest.mark.parametrize("algorithm", ["pairwise", "gram"])
def test_batch_of_two_matches_lightly(algorithm):
    """N = 2: each standardised column is ±1/sqrt(1 + 1e-5/v), nearly independent of the
    input, so the gradient is the small difference of O(1) terms (relative conditioning
    ~ v/1e-5).  Values to 1e-12; gradients to 1e-12 of the gradient *before* the
    standardisation's Jacobian (the size of the terms that cancel)."""
    za, zb = _views(2, 3, seed=1)
    want = _value_and_grads(lightly_loss.BarlowTwinsLoss(), za, zb)
    got = _value_and_grads(mk.BarlowTwinsLoss(algorithm=algorithm, backend="reference"), za, zb)
    _assert_rel(got[:1], want[:1], REL)
    na = home.barlow_twins_standardize(za.detach()).requires_grad_()
    nb = home.barlow_twins_standardize(zb.detach()).requires_grad_()
    c = na.T @ nb / 2
    pre = torch.autograd.grad(home._loss_from_c(c, 5e-3) * 1.3, (na, nb))
    rstd = [1 / z.detach().var(dim=0, unbiased=False).sqrt() for z in (za, zb)]
    for a, w, p, r in zip(got[1:], want[1:], pre, rstd):
        assert float((a - w).abs().max()) <= REL * float((p * r).abs().max())


def test_constructor_matches_lightly_signature():
    ours = inspect.signature(mk.BarlowTwinsLoss.__init__).parameters
    theirs = inspect.signature(lightly_loss.BarlowTwinsLoss.__init__).parameters
    for name, p in theirs.items():
        assert name in ours and ours[name].default == p.default, name
    assert list(ours)[:len(theirs)] == list(theirs)  # same positional order
    m = mk.BarlowTwinsLoss()
    assert m.lambda_param == 5e-3 and m.gather_distributed is False


def test_gradcheck_eager_math():
    for algorithm in ("pairwise", "gram"):
        za, zb = _views(5, 4, seed=3)
        assert torch.autograd.gradcheck(
            lambda a, c: reference.barlow_twins_loss(a, c, 0.3, algorithm), (za, zb))
        assert torch.autograd.gradgradcheck(
            lambda a, c: reference.barlow_twins_loss(a, c, 0.3, algorithm), (za, zb))


def test_float32_and_half_return_float32():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        za, zb = _views(8, 6, dtype)
        loss = mk.BarlowTwinsLoss(backend="reference")(za, zb)
        assert loss.dtype == torch.float32 and loss.shape == ()
        ga, = torch.autograd.grad(loss, za)
        assert ga.dtype == dtype


def test_torch_compile_fullgraph_module():
    za, zb = _views(9, 7, torch.float32, seed=4)
    m = mk.BarlowTwinsLoss(0.1, backend="reference")
    torch._dynamo.reset()
    got = _value_and_grads(torch.compile(m, fullgraph=True, backend="eager"), za, zb)
    want = _value_and_grads(m, za, zb)
    _assert_rel(got, want, 1e-6)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: mk.BarlowTwinsLoss()(torch.randn(1, 4), torch.randn(1, 4)), ValueError, "B >= 2"),
    (lambda: mk.BarlowTwinsLoss()(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "same shape"),
    (lambda: mk.BarlowTwinsLoss()(torch.randn(3, 4, 2), torch.randn(3, 4, 2)), ValueError, "2 dims"),
    (lambda: mk.BarlowTwinsLoss()(torch.randn(3, 4), torch.randn(3, 4).double()), TypeError, "dtype"),
    (lambda: mk.BarlowTwinsLoss(lambda_param=float("nan")), ValueError, "lambda_param"),
    (lambda: mk.BarlowTwinsLoss(lambda_param=-1.0), ValueError, "lambda_param"),
    (lambda: mk.BarlowTwinsLoss(lambda_param="0.1"), TypeError, "lambda_param"),
    (lambda: mk.BarlowTwinsLoss(algorithm="kxk"), ValueError, "algorithm"),
    (lambda: mk.BarlowTwinsLoss(backend="cuda"), ValueError, "backend"),
    (lambda: Fn.barlow_twins_loss(torch.randn(3, 4), torch.randn(3, 4), float("inf")),
     ValueError, "lambda_param"),
])
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_gather_distributed_is_a_noop_without_process_group():
    za, zb = _views(6, 5, seed=6)
    a = mk.BarlowTwinsLoss(gather_distributed=True)(za, zb)
    b = mk.BarlowTwinsLoss()(za, zb)
    assert torch.equal(a, b)


def test_registry_entry():
    spec = REGISTRY["barlow_twins"]
    assert spec.module is mk.BarlowTwinsLoss and spec.functional is mk.barlow_twins_loss
    za, zb = _views(6, 5, torch.float32, seed=7)
    for variant in ({}, *spec.variants.values()):
        assert torch.allclose(spec.step(za, zb, backend="reference", **variant),
                              spec.reference(za, zb), rtol=1e-5)
    fwd, bwd = spec.matmul_flops(256, 8192)
    assert fwd > 0 and bwd > 0
    assert home.BN_EPS == 1e-5


# ----------------------------------------------------------------------------- Triton kernels
# Under TRITON_INTERPRET=1 on the CPU (conftest), on CUDA when present; tiny shapes.
triton = pytest.importorskip("triton")
from minc_kernels.ops import barlow_twins as ops  # noqa: E402

F32 = dict(rel=2e-6, abs=1e-7)  # as tests/test_ops_spectral.py


def _oracle(za, zb, lam, g):
    """lightly's loss on float64 copies: value and gradients."""
    a = za.detach().cpu().double().requires_grad_()
    b = zb.detach().cpu().double().requires_grad_()
    return _value_and_grads(lightly_loss.BarlowTwinsLoss(lambda_param=lam), a, b, g)


def _kernel(lam, algorithm):
    return lambda a, b: ops.barlow_twins_loss(a, b, lam, algorithm)


def _run(fn, za, zb, g):
    return [t.cpu().double() for t in _value_and_grads(fn, za, zb, g)]


def _close(got, want, rel=F32["rel"], abs_=F32["abs"]):
    for name, a, w in zip(("loss", "dz_a", "dz_b"), got, want):
        err, scale = float((a - w).abs().max()), float(w.abs().max())
        assert err <= rel * scale + abs_, (name, err, scale)


@pytest.mark.parametrize("b,k", [(2, 5), (7, 33), (37, 5), (20, 20)])
@pytest.mark.parametrize("algorithm", ["pairwise", "gram", "auto"])
@pytest.mark.parametrize("lam", [5e-3, 0.8])
def test_triton_fp32_matches_lightly(kernel_device, b, k, algorithm, lam):
    za, zb = _views(b, k, torch.float32, seed=b + k, device=kernel_device)
    want = _oracle(za, zb, lam, 1.7)
    got = _run(_kernel(lam, algorithm), za, zb, 1.7)
    if b == 2:  # the standardisation's Jacobian cancels (test_batch_of_two_matches_lightly)
        _close(got[:1], want[:1])
        return
    _close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["pairwise", "gram"])
@pytest.mark.parametrize("b,k", [(7, 33), (37, 5)])
def test_triton_half_error_within_3x_of_eager(kernel_device, dtype, algorithm, b, k):
    za, zb = _views(b, k, dtype, seed=1, device=kernel_device)
    want = _oracle(za, zb, 0.3, -0.6)
    got = _run(_kernel(0.3, algorithm), za, zb, -0.6)
    eager = _run(lambda a, c: reference.barlow_twins_loss(a, c, 0.3, algorithm), za, zb, -0.6)
    eps = torch.finfo(dtype).eps
    for name, a, e, w in zip(("loss", "dz_a", "dz_b"), got, eager, want):
        err, err_eager = float((a - w).abs().max()), float((e - w).abs().max())
        floor = 0.5 * eps * float(w.abs().max())
        assert err <= 3 * err_eager + floor, (name, err, err_eager, floor)


def test_triton_output_is_fp32_scalar_and_grads_in_input_dtype(kernel_device):
    za, zb = _views(7, 5, torch.bfloat16, device=kernel_device)
    loss = ops.barlow_twins_loss(za, zb, 5e-3, "pairwise")
    assert loss.dtype == torch.float32 and loss.shape == ()
    ga, gb = torch.autograd.grad(loss, (za, zb))
    assert ga.dtype == torch.bfloat16 and gb.shape == zb.shape


@pytest.mark.parametrize("algorithm", ["pairwise", "gram"])
def test_triton_noncontiguous_inputs(kernel_device, algorithm):
    za, zb = _views(9, 33, torch.float32, seed=2, device=kernel_device)
    a = za.detach().T.contiguous().T.requires_grad_()
    b = torch.cat([zb.detach(), zb.detach()], dim=1)[:, ::2].requires_grad_()
    assert not a.is_contiguous() and not b.is_contiguous()
    _close(_run(_kernel(0.1, algorithm), a, b, 0.9), _oracle(a, b, 0.1, 0.9))


def test_triton_pairwise_and_gram_agree(kernel_device):
    za, zb = _views(21, 17, torch.float32, seed=3, device=kernel_device)
    a = _run(_kernel(0.2, "pairwise"), za, zb, 1.0)
    b = _run(_kernel(0.2, "gram"), za, zb, 1.0)
    _close(a, b, rel=1e-6, abs_=0.0)


@pytest.mark.parametrize("algorithm", ["pairwise", "gram"])
def test_triton_forward_only_and_deterministic(kernel_device, algorithm):
    za, zb = _views(19, 9, torch.float32, seed=4, device=kernel_device)
    loss, ga, gb = ops.barlow_twins_loss_fwd(za.detach(), zb.detach(), 0.1, algorithm, False)
    assert ga.numel() == 0 and gb.numel() == 0
    with torch.no_grad():
        again = ops.barlow_twins_loss(za, zb, 0.1, algorithm)
    assert torch.equal(loss, again)
    _close([loss.cpu().double()], _oracle(za, zb, 0.1, 1.0)[:1])
    r1 = _run(_kernel(0.1, algorithm), za, zb, 1.0)
    r2 = _run(_kernel(0.1, algorithm), za, zb, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))


def test_triton_auto_runs_the_cost_model_choice(kernel_device):
    za, zb = _views(37, 5, torch.float32, seed=5, device=kernel_device)
    choice = ops.choose_algorithm(37, 5, torch.float32, True)
    a = _run(_kernel(0.1, "auto"), za, zb, 1.0)
    b = _run(_kernel(0.1, choice), za, zb, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_triton_backward_without_saved_gradient_raises(kernel_device):
    za, zb = _views(7, 5, torch.float32, device=kernel_device)
    loss, _, _ = ops.barlow_twins_loss_fwd(za, zb, 0.1, "gram", False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.backward()


def test_triton_module_and_functional(kernel_device):
    za, zb = _views(11, 6, torch.float32, seed=6, device=kernel_device)
    want = _oracle(za, zb, 5e-3, 1.0)
    _close(_run(mk.BarlowTwinsLoss(backend="triton"), za, zb, 1.0), want)
    _close(_run(lambda a, c: Fn.barlow_twins_loss(a, c, backend="triton"), za, zb, 1.0), want)


def test_triton_cross_correlation_op_matches_eager(kernel_device):
    """The distributed form's op: Ẑaᵀ Ẑb and its backward (a real one), against autograd
    through the eager standardisation."""
    za, zb = _views(13, 9, torch.float32, seed=12, device=kernel_device)
    g = torch.randn(9, 9, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    got = ops.cross_correlation(za, zb)
    ga, gb = torch.autograd.grad((got * g).sum(), (za, zb))
    a, b = za.detach().cpu().double().requires_grad_(), zb.detach().cpu().double().requires_grad_()
    want = home.barlow_twins_standardize(a).T @ home.barlow_twins_standardize(b)
    wa, wb = torch.autograd.grad((want * g.cpu().double()).sum(), (a, b))
    _close([got.detach().cpu().double(), ga.cpu().double(), gb.cpu().double()],
           [want.detach(), wa, wb])
    torch.library.opcheck(ops.barlow_twins_cross_corr, (za, zb))


@pytest.mark.parametrize("algorithm", ["pairwise", "gram"])
def test_triton_opcheck(kernel_device, algorithm):
    za, zb = _views(7, 5, torch.float32, seed=9, device=kernel_device)
    torch.library.opcheck(ops.barlow_twins_loss_fwd, (za, zb, 0.1, algorithm, True))
    torch.library.opcheck(ops.barlow_twins_loss_fwd, (za.detach(), zb.detach(), 0.1, algorithm, False))


def test_triton_torch_compile_fullgraph(kernel_device):
    m = mk.BarlowTwinsLoss(0.1, backend="triton")
    za, zb = _views(7, 5, torch.float32, seed=10, device=kernel_device)
    torch._dynamo.reset()
    got = _run(torch.compile(m, fullgraph=True), za, zb, 1.1)
    want = _run(m, za, zb, 1.1)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.gpu
@pytest.mark.parametrize("b,k", [(256, 2048), (1024, 256), (4099, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ["pairwise", "gram", "auto"])
def test_triton_gpu_large_shapes(b, k, dtype, algorithm):
    za, zb = _views(b, k, dtype, seed=11, device="cuda")
    want = _oracle(za, zb, 5e-3, 0.8)
    got = _run(_kernel(5e-3, algorithm), za, zb, 0.8)
    if dtype == torch.float32:
        _close(got, want, rel=1e-5)
        return
    eager = _run(lambda a, c: reference.barlow_twins_loss(a, c, 5e-3, algorithm), za, zb, 0.8)
    eps = torch.finfo(dtype).eps
    for a, e, w in zip(got, eager, want):
        err, err_eager = float((a - w).abs().max()), float((e - w).abs().max())
        assert err <= 3 * err_eager + 0.5 * eps * float(w.abs().max())


# ----------------------------------------------------------------------------- distributed
# W = 2 gloo processes with 4 rows each (docs/math.md §7): our gather_distributed=True against
# lightly's in the same processes (values, gradients, DDP updates), and against the
# single-process loss of the rank-averaged C (each half standardised on its own).
import os  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

W, HALF, LR = 2, 4, 0.1


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).to(dtype)


def _batch(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(50 + step)
    x1 = torch.randn(W * HALF, 6, generator=g, dtype=torch.float64)
    x2 = x1 + 0.5 * torch.randn(W * HALF, 6, generator=g, dtype=torch.float64)
    return x1.to(dtype), x2.to(dtype)


def _train(loss_fn, rank=None, steps=2, dtype=torch.float64):
    """SGD steps on rank ``rank``'s rows under DDP, or on every row (``rank=None``)."""
    net = _net(dtype)
    model = nn.parallel.DistributedDataParallel(net) if rank is not None else net
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        x1, x2 = _batch(step, dtype)
        if rank is not None:
            x1, x2 = x1[rank * HALF:(rank + 1) * HALF], x2[rank * HALF:(rank + 1) * HALF]
        n = x1.shape[0]
        z = model(torch.cat([x1, x2]))
        loss = loss_fn(z[:n], z[n:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return {"loss": losses, "params": [p.detach().clone() for p in net.parameters()]}


def _averaged_c_loss(za, zb, lam=5e-3):
    """The single-process form of lightly's W = 2 loss: L((C_0 + C_1)/2), C_r of half r."""
    cs = [home.barlow_twins_standardize(za[r * HALF:(r + 1) * HALF]).T
          @ home.barlow_twins_standardize(zb[r * HALF:(r + 1) * HALF]) / HALF for r in range(W)]
    return home._loss_from_c(sum(cs) / W, lam)


def _loss_level(rank, fn):
    x1, x2 = _batch(7)
    g = torch.Generator().manual_seed(9)
    za = (x1 @ torch.randn(6, 5, generator=g, dtype=torch.float64))[rank * HALF:(rank + 1) * HALF]
    zb = (x2 @ torch.randn(6, 5, generator=g, dtype=torch.float64))[rank * HALF:(rank + 1) * HALF]
    return _value_and_grads(fn, za.requires_grad_(), zb.requires_grad_())


def _dist_worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    res = {}

    def run(name, fn):
        try:
            res[name] = fn()
        except Exception:  # reported by the test that reads it
            res[name] = {"error": traceback.format_exc()}

    ours = mk.BarlowTwinsLoss(gather_distributed=True)
    theirs = lightly_loss.BarlowTwinsLoss(gather_distributed=True)
    run("loss_ours", lambda: _loss_level(rank, ours))
    run("loss_lightly", lambda: _loss_level(rank, theirs))
    run("train_ours", lambda: _train(ours, rank))
    run("train_lightly", lambda: _train(theirs, rank))
    for alg in ("pairwise", "gram"):  # algorithm is ignored when distributed: one C all-reduce
        run(f"train_ours_{alg}", lambda alg=alg: _train(
            mk.BarlowTwinsLoss(gather_distributed=True, algorithm=alg), rank))
    run("train_triton", lambda: _train(mk.BarlowTwinsLoss(gather_distributed=True,
                                                          backend="triton"), rank,
                                       dtype=torch.float32))
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is needed")
    with tempfile.TemporaryDirectory() as outdir:
        spawn(_dist_worker, (free_port(), outdir), nprocs=W)
        yield [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
               for r in range(W)]


def _get(results, name):
    for r, res in enumerate(results):
        if isinstance(res[name], dict) and "error" in res[name]:
            pytest.fail(f"rank {r}, {name!r} raised:\n{res[name]['error']}")
    return [res[name] for res in results]


def test_distributed_matches_lightly_values_and_gradients(dist_results):
    ours, theirs = _get(dist_results, "loss_ours"), _get(dist_results, "loss_lightly")
    for o, t in zip(ours, theirs):
        _assert_rel(o, t, REL)
    assert torch.equal(ours[0][0], ours[1][0])  # the same loss on every rank


def test_distributed_ddp_updates_match_lightly_and_single_process(dist_results):
    ours, theirs = _get(dist_results, "train_ours"), _get(dist_results, "train_lightly")
    single = _train(_averaged_c_loss)
    for r in range(W):
        for a, b, c in zip(ours[r]["params"], theirs[r]["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
        for a, c in zip(ours[r]["loss"], single["loss"]):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=0.0)
    # the update is not the one of the global batch (per-rank statistics): the test can tell
    plain = _train(mk.BarlowTwinsLoss())
    assert max(float((a - c).abs().max()) for a, c in zip(ours[0]["params"], plain["params"])) > 1e-6
    for alg in ("pairwise", "gram"):
        for a, b in zip(_get(dist_results, f"train_ours_{alg}")[0]["params"], ours[0]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- lightly drop-in
# lightly's own model pieces (backbone + BarlowTwinsProjectionHead projection head, SGD lr 0.06 as its example,
# the two-view call ``criterion(z0, z1)``) with only the criterion swapped; the images,
# augmentations and backbone of tests/test_lightly.py.
DROPIN_STEPS, DROPIN_BATCH, DROPIN_WINDOW = 30, 64, 6


def _dropin_losses(criterion, seed=0):
    import math

    import test_lightly as tl_

    heads = pytest.importorskip("lightly.models.modules.heads")
    torch.manual_seed(seed)
    backbone = tl_._backbone()
    head = heads.BarlowTwinsProjectionHead(64, 128, 128)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.06)
    data = tl_._images(512, seed)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(DROPIN_STEPS):
        x = data[torch.randint(0, data.shape[0], (DROPIN_BATCH,), generator=g)]
        x0, x1 = tl_._view(x, g), tl_._view(x, g)
        z0 = head(backbone(x0).flatten(start_dim=1))
        z1 = head(backbone(x1).flatten(start_dim=1))
        loss = criterion(z0, z1)
        loss.backward()
        opt.step()
        opt.zero_grad()
        val = float(loss.detach())  # a test, not a hot path
        assert math.isfinite(val), (step, val)
        losses.append(val)
    return losses


def test_dropin_in_lightly_model_trains_like_lightly():
    ours = _dropin_losses(mk.BarlowTwinsLoss())
    theirs = _dropin_losses(lightly_loss.BarlowTwinsLoss())
    w = DROPIN_WINDOW
    first, last = sum(ours[:w]) / w, sum(ours[-w:]) / w
    assert last < 0.9 * first, (first, last, ours)
    # the same function of the same data: the same trajectory up to fp32 rounding, which
    # SGD amplifies step by step (about 1e-6 relative after 5 steps, 1e-2 after 20 here)
    for a, b in zip(ours[:5], theirs[:5]):
        assert a == pytest.approx(b, rel=1e-4), (ours, theirs)
    assert last == pytest.approx(sum(theirs[-w:]) / w, rel=0.1), (ours, theirs)


def test_device_tile_configs_of_the_new_kernels():
    """The GPU tiles (checked for registers/spills by a static sm_90 compile, see
    ops/configs.py): colstats fills a wave of 132 SMs from k = 2097 on, 2048-element tiles;
    cross_gram takes 16-row chunks for fp32 rows that are not 16-element aligned."""
    from minc_kernels.ops import configs

    for k in (1, 130, 512, 1001, 2096, 2097, 4096, 8192, 16384):
        cfg = configs.colstats_config(k, for_device=True)
        assert cfg["BLOCK_B"] * cfg["BLOCK_K"] == 2048 and cfg["BLOCK_K"] >= 16
        assert (-(-k // cfg["BLOCK_K"]) >= 132) == (k >= 2097), (k, cfg)
    assert configs.cross_gram_config(1001, torch.float32, for_device=True)["BLOCK_B"] == 16
    assert configs.cross_gram_config(1024, torch.float32, for_device=True) == \
        configs.gram_config(1024, torch.float32, for_device=True)


def test_cost_model_picks_the_smaller_side_from_the_spectral_estimates(monkeypatch, request):
    for dtype in (torch.float32, torch.bfloat16):
        for need_grad in (False, True):
            assert ops.choose_algorithm(256, 8192, dtype, need_grad) == "pairwise"
            # (at 4096×8192 bf16 with the gradient the model prices a tie: the k×k path's
            # rounded Γ takes one native dot per tile, the N×N path's fp32 Grams three)
            assert ops.choose_algorithm(2048, 8192, dtype, need_grad) == "pairwise"
            assert ops.choose_algorithm(4096, 512, dtype, need_grad) == "gram"
    # it is the spectral model's Gram-path estimate, of Zᵀ against Z
    calls = []

    def fake(b, k, dtype, need_grad, round_grams=True, finish=0):
        calls.append((b, k, round_grams, finish))
        return {"gram": 1.0 if b == 8 else 2.0, "pairwise": 0.0}

    monkeypatch.setattr(ops, "estimate_seconds", fake)
    ops.model_choice.cache_clear()  # the model's choice is cached per shape: no old
    request.addfinalizer(ops.model_choice.cache_clear)  # answers in, no fake ones out
    assert ops.choose_algorithm(8, 3, torch.float32, True) == "gram"
    assert ops.choose_algorithm(3, 8, torch.float32, True) == "pairwise"
    # Zᵀ (the N×N path) keeps its fp32 Grams; Z (the k×k path) finishes its C in one pass
    # (VICReg: its two Grams), which rounds Γ where rows are bf16
    assert sorted(calls[:2]) == [(3, 8, False, 0), (8, 3, True, 1)]
    calls.clear()  # VICReg's k×k path keeps its fp32 Γ
    ops.choose_algorithm(8, 3, torch.float32, True, loss="vicreg")
    assert sorted(calls) == [(3, 8, False, 0), (8, 3, False, 2)]
    calls.clear()  # cached: the same question asks the model nothing
    assert ops.choose_algorithm(8, 3, torch.float32, True, loss="vicreg") == "gram"
    assert calls == []


def test_distributed_triton_ddp_matches_single_process(dist_results):
    """The kernels form each rank's C (fp32, interpreted on the CPU) under DDP."""
    got = _get(dist_results, "train_triton")
    single = _train(_averaged_c_loss, dtype=torch.float32)
    for r in range(W):
        for a, c in zip(got[r]["params"], single["params"]):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
