"""ema_update_ (whatever path is live) and MomentumEncoder, against the docs/math.md §4 formula."""
import pytest
import torch
from torch import nn

import minc_kernels as mk


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", ["auto", "foreach"])
@pytest.mark.parametrize("momentum", [0.0, 0.37, 0.996, 1.0])
def test_ema_update_formula(backend, momentum):
    shapes = [(3,), (5, 7), (0,), (2, 3, 4), (1,)]
    t = [_rand(*s, seed=i) for i, s in enumerate(shapes)]
    o = [_rand(*s, seed=100 + i) for i, s in enumerate(shapes)]
    want = [momentum * a.double() + (1 - momentum) * b.double() for a, b in zip(t, o)]
    mk.ema_update_(t, o, momentum, backend=backend)
    for a, w in zip(t, want):
        torch.testing.assert_close(a.double(), w, rtol=2e-7, atol=2e-7)
    if momentum == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(t, o))


def test_ema_update_bf16_online_into_fp32_target():
    t = [_rand(1000, seed=1)]
    o = [_rand(1000, seed=2, dtype=torch.bfloat16)]
    want = 0.999 * t[0].double() + 0.001 * o[0].double()
    mk.ema_update_(t, o, 0.999)
    assert t[0].dtype == torch.float32
    torch.testing.assert_close(t[0].double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ([_rand(3)], [_rand(3), _rand(3)], 0.5), "same number"),
        (lambda: ([_rand(3)], [_rand(4)], 0.5), r"shape .*[(\[]3,?[)\]].*[(\[]4,?[)\]]"),
        (lambda: ([_rand(3)], [_rand(3)], 1.5), "momentum"),
        (lambda: ([torch.zeros(3, dtype=torch.long)], [_rand(3)], 0.5), "target\\[1\\] must be a floating"),
        (lambda: ([_rand(3)], [torch.ones(3, device="meta")], 0.5), "device"),
    ],
)
@pytest.mark.parametrize("check_finite", [True, False])  # False: the extension's own C++ checks
def test_ema_update_errors_leave_targets_untouched(make, match, check_finite):
    targets, onlines, m = make()
    good_t, good_o = _rand(5, seed=9), _rand(5, seed=10)
    targets = [good_t] + targets
    onlines = [good_o] + onlines
    snap = [x.clone() for x in targets]
    with pytest.raises((ValueError, TypeError), match=match):
        mk.ema_update_(targets, onlines, m, check_finite=check_finite)
    assert all(torch.equal(a, b) for a, b in zip(targets, snap))


def test_ema_update_refuses_non_finite_online():
    t = [_rand(4, seed=1), _rand(4, seed=2)]
    o = [_rand(4, seed=3), _rand(4, seed=4)]
    o[1][2] = float("nan")
    snap = [x.clone() for x in t]
    with pytest.raises(ValueError, match="NaN or Inf"):
        mk.ema_update_(t, o, 0.9, check_finite=True)  # opt-in (a host sync)
    assert all(torch.equal(a, b) for a, b in zip(t, snap))
    # default: no value is read on the host (issue 13), so the NaN goes through
    mk.ema_update_(t, o, 0.9)
    assert torch.isnan(t[1][2])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_momentum_encoder_copy_update_and_state_dict():
    online = _net()
    enc = mk.MomentumEncoder(online)
    assert all(not p.requires_grad for p in enc.target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    # only the target is owned: the optimizer of the online net must not see it twice
    assert len(list(enc.parameters())) == len(list(online.parameters()))
    assert all(k.startswith("target.") for k in enc.state_dict())

    before = [p.detach().clone() for p in enc.target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online.train()
    online(torch.randn(16, 4))  # moves BN running stats and num_batches_tracked
    enc.update(0.9)
    for b, t, o in zip(before, enc.target.parameters(), online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o.detach())
    bn_t, bn_o = enc.target[1], online[1]
    assert torch.equal(bn_t.num_batches_tracked, bn_o.num_batches_tracked)  # integer: copied
    torch.testing.assert_close(bn_t.running_mean, 0.1 * bn_o.running_mean)  # float: lerped from 0

    enc2 = mk.MomentumEncoder(_net())
    enc2.load_state_dict(enc.state_dict())
    x = torch.randn(5, 4)
    enc.eval(), enc2.eval()
    torch.testing.assert_close(enc(x), enc2(x))
    assert not enc(x).requires_grad


def test_momentum_encoder_copy_buffers_option():
    online = _net()
    enc = mk.MomentumEncoder(online, ema_buffers=False)
    online.train()
    online(torch.randn(16, 4))
    enc.update(0.99)
    assert torch.equal(enc.target[1].running_mean, online[1].running_mean)


def test_momentum_encoder_errors():
    with pytest.raises(TypeError, match="online must be an nn.Module"):
        mk.MomentumEncoder(torch.zeros(3))
    enc = mk.MomentumEncoder(_net())
    snap = [p.clone() for p in enc.target.parameters()]
    with pytest.raises(ValueError, match="momentum"):
        enc.update(-0.1)
    with torch.no_grad():
        next(enc.online.parameters())[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        enc.update(0.5, check_finite=True)
    assert all(torch.equal(a, b) for a, b in zip(enc.target.parameters(), snap))


def test_cosine_momentum_exported():
    assert mk.cosine_momentum(0, 10) == pytest.approx(0.996)
    assert mk.cosine_momentum(10, 10, base=0.99) == pytest.approx(1.0)


def test_momentum_encoder_walk_matches_parameters_and_buffers():
    """MomentumEncoder.update gathers the tensors in one walk (ema._params_and_buffers);
    it must give exactly module.parameters() and module.buffers(): same tensors, same order,
    shared modules and tied weights once, None entries skipped."""
    from minc_kernels.ema import _params_and_buffers

    lin = torch.nn.Linear(3, 3)
    inner = torch.nn.Sequential(lin, torch.nn.ReLU(), lin, torch.nn.BatchNorm1d(3))
    inner.add_module("absent", None)
    inner.register_parameter("no_param", None)
    inner.register_buffer("no_buffer", None)
    net = torch.nn.Sequential(inner, torch.nn.Linear(3, 3), torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    net[1].weight = lin.weight  # tied
    params, buffers = _params_and_buffers(net)
    assert [id(p) for p in params] == [id(p) for p in net.parameters()]
    assert [id(b) for b in buffers] == [id(b) for b in net.buffers()]
    assert len(params) == 7 and len(buffers) == 6  # the tied weight once
    # and the update follows a structural change made after construction
    enc = mk.MomentumEncoder(net)
    net[2][0] = torch.nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="shape|match"):
        enc.update(0.9)


@pytest.mark.parametrize("backend", ["auto", "foreach"])
def test_ema_update_on_parameters_that_require_grad_in_grad_mode(backend):
    """ema_update_ runs its foreach path under no_grad itself (the extension's op is not
    differentiable): targets that are leaf Parameters with requires_grad, updated with grad
    mode on, are updated in place without an autograd error and without a graph."""
    target = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    online = [torch.ones(3, requires_grad=True), torch.ones(2, 2, requires_grad=True)]
    assert torch.is_grad_enabled()
    mk.ema_update_(target, online, 0.75, backend=backend)
    for t in target:
        assert t.grad_fn is None and t.requires_grad
        torch.testing.assert_close(t.detach(), torch.full_like(t, 0.25))


# ------------------------------------------------------ aliasing, argument order, modules
BACKENDS = ["auto", "foreach"]


def _alias_cases():
    x = _rand(16, seed=7)
    y = _rand(16, seed=8)
    return [
        ("same target twice", lambda: ([x, x], [_rand(16, seed=1), _rand(16, seed=2)]), "share memory"),
        ("overlapping targets", lambda: ([x[:10], x[6:]], [_rand(10, seed=1), _rand(10, seed=2)]),
         "share memory"),
        # target[0] is online[1]: the result would depend on which pair is updated first
        ("crossed", lambda: ([x, y], [_rand(16, seed=1), x]), r"target\[0\].*online\[1\].*share memory"),
        ("partial self", lambda: ([x[:8]], [x[4:12]]), r"target\[0\].*online\[0\].*share memory"),
        ("reinterpreted self", lambda: ([x[:8]], [x.view(torch.bfloat16)[:8]]), "share memory"),
    ]


def _without_extension(monkeypatch):
    """The foreach path as without a built extension: its Python aliasing check."""
    from minc_kernels import ema

    monkeypatch.setattr(ema._ext, "load", lambda required=False: None)


@pytest.mark.parametrize("backend", BACKENDS + ["foreach-python"])
@pytest.mark.parametrize("name,make,match", _alias_cases(), ids=[c[0] for c in _alias_cases()])
def test_aliasing_is_refused_on_every_backend(backend, name, make, match, monkeypatch):
    if backend == "foreach-python":
        _without_extension(monkeypatch)
        backend = "foreach"
    targets, onlines = make()
    snap = [t.clone() for t in targets]
    with pytest.raises(ValueError, match=match):
        mk.ema_update_(targets, onlines, 0.5, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(targets, snap))


@pytest.mark.parametrize("backend", BACKENDS + ["foreach-python"])
def test_a_target_that_is_its_own_online_is_a_noop(backend, monkeypatch):
    if backend == "foreach-python":
        _without_extension(monkeypatch)
        backend = "foreach"
    x = _rand(6, seed=1)
    keep = x.clone()
    mk.ema_update_([x], [x], 0.3, backend=backend)
    assert torch.equal(x, keep)
    # reads may share memory (one online tensor for two targets); strided disjoint views pass
    buf = _rand(8, seed=2)
    a, b = _rand(4, seed=3), _rand(4, seed=4)
    mk.ema_update_([a, b], [buf[:4], buf[:4]], 0.5, backend=backend)
    # strided views are compared by memory range: row blocks pass, interleaved columns
    # (disjoint elements, overlapping ranges) are refused, conservatively
    big = torch.zeros(6, 4)
    mk.ema_update_([big[:3, ::2], big[3:, ::2]], [_rand(3, 2, seed=5), _rand(3, 2, seed=6)], 0.5,
                   backend="foreach")
    with pytest.raises(ValueError, match="share memory"):
        mk.ema_update_([big[:, :2], big[:, 2:]], [_rand(6, 2, seed=5), _rand(6, 2, seed=6)], 0.5,
                       backend="foreach")


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_order_is_refused(backend):
    """lightly's update_momentum(model, model_ema, m) puts the trained model first; ours is
    (target, online): trained weights (requires grad) as targets of a frozen copy are refused."""
    online = _net()
    ema = _net()
    for p in ema.parameters():
        p.requires_grad_(False)
    snap = [p.detach().clone() for p in online.parameters()]
    with pytest.raises(ValueError, match=r"target\[0\] requires grad but online\[0\] does not.*swapped"):
        mk.ema_update_(list(online.parameters()), list(ema.parameters()), 0.9, backend=backend)
    with pytest.raises(ValueError, match="swapped"):
        mk.ema_update_(online, ema, 0.9, backend=backend)  # modules, lightly's order
    assert all(torch.equal(p.detach(), s) for p, s in zip(online.parameters(), snap))


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_mean_their_parameters(backend):
    online = _net()
    ema = _net()
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
        ema[1].running_mean.fill_(3.0)
    for p in ema.parameters():
        p.requires_grad_(False)
    want = [p.detach().clone() for p in ema.parameters()]
    mk.ema_update_(want, list(online.parameters()), 0.75, backend=backend)
    mk.ema_update_(ema, online, 0.75, backend=backend)
    assert all(torch.equal(p, w) for p, w in zip(ema.parameters(), want))
    assert torch.equal(ema[1].running_mean, torch.full((8,), 3.0))  # buffers: MomentumEncoder's job
    with pytest.raises(TypeError, match="both be nn.Modules or both sequences"):
        mk.ema_update_(ema, list(online.parameters()), 0.75, backend=backend)


# ------------------------------------------------------------------ tensor momentum
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mdtype", [torch.float64, torch.float32])
def test_tensor_momentum_matches_float_momentum(backend, mdtype):
    shapes = [(3,), (5, 7), (0,), (1,)]
    m = torch.tensor(0.37, dtype=mdtype)
    for odtype in (torch.float32, torch.bfloat16):
        a = [_rand(*s, seed=i) for i, s in enumerate(shapes)]
        b = [x.clone() for x in a]
        o = [_rand(*s, seed=50 + i, dtype=odtype) for i, s in enumerate(shapes)]
        mk.ema_update_(a, o, m, backend=backend)
        mk.ema_update_(b, o, float(m), backend=backend)  # the same value as a Python float
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_momentum_errors(backend):
    t, o = [torch.zeros(3)], [torch.ones(3)]
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        mk.ema_update_(t, o, torch.tensor(1.5), backend=backend)  # a CPU value: checked
    with pytest.raises(ValueError, match="0-dim"):
        mk.ema_update_(t, o, torch.tensor([0.5]), backend=backend)
    with pytest.raises(TypeError, match="float32 or float64"):
        mk.ema_update_(t, o, torch.tensor(0.5, dtype=torch.bfloat16), backend=backend)
    assert torch.equal(t[0], torch.zeros(3))


def _count_compiles(fn, steps=20):
    """Calls ``fn(momentum)`` with a cosine schedule held in one 0-dim tensor, compiled with
    fullgraph=True and torch._dynamo.testing.CompileCounter; returns the frame count."""
    import torch._dynamo.testing as dynamo_testing

    torch._dynamo.reset()
    counter = dynamo_testing.CompileCounter()
    step = torch.compile(fn, backend=counter, fullgraph=True)
    momentum = torch.zeros((), dtype=torch.float64)
    for s in range(steps):
        momentum.fill_(mk.cosine_momentum(s, steps))
        step(momentum)
    return counter.frame_count


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_schedule_compiles_once_ema_update(backend):
    t = [_rand(5, seed=1), _rand(2, 3, seed=2)]
    o = [_rand(5, seed=3), _rand(2, 3, seed=4)]
    want = [x.clone() for x in t]
    for s in range(20):
        mk.ema_update_(want, o, mk.cosine_momentum(s, 20), backend=backend)
    n = _count_compiles(lambda m: mk.ema_update_(t, o, m, backend=backend))
    assert n == 1
    for a, b in zip(t, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_schedule_compiles_once_momentum_encoder(backend):
    online = _net()
    online.train()
    online(torch.randn(16, 4))
    enc, ref = mk.MomentumEncoder(online), mk.MomentumEncoder(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    n = _count_compiles(lambda m: enc.update(m, backend=backend))
    assert n == 1
    for s in range(20):
        ref.update(mk.cosine_momentum(s, 20), backend=backend)
    for a, b in zip(enc.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_order_is_refused_under_compile(backend):
    """Under aot_eager the extension's op runs on functionalized copies (no requires_grad):
    the order is checked while tracing instead; the error names the swap."""
    online, ema = _net(), _net()
    for p in ema.parameters():
        p.requires_grad_(False)
    snap = [p.detach().clone() for p in online.parameters()]
    torch._dynamo.reset()
    step = torch.compile(lambda m: mk.ema_update_(online, ema, m, backend=backend),
                         backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="swapped"):
        step(torch.tensor(0.5, dtype=torch.float64))
    assert all(torch.equal(p.detach(), s) for p, s in zip(online.parameters(), snap))


def test_momentum_encoder_with_a_given_target():
    """target=: the copy is the module given (for modules that cannot be deep-copied, e.g.
    FSDP2's), set from online's values, frozen; a mismatched module is refused."""
    online = _net()
    online.train()
    online(torch.randn(16, 4))  # BN buffers away from their initial values
    given = _net()
    with torch.no_grad():
        for p in given.parameters():
            p.fill_(float("nan"))  # anything: overwritten
    enc = mk.MomentumEncoder(online, target=given)
    assert enc.target is given
    for a, b in zip([*given.parameters(), *given.buffers()], [*online.parameters(), *online.buffers()]):
        assert torch.equal(a, b.detach())
    assert all(not p.requires_grad for p in given.parameters())
    assert all(p.requires_grad for p in online.parameters())
    enc.update(0.5)
    with pytest.raises(ValueError, match="another module than online"):
        mk.MomentumEncoder(online, target=online)
    with pytest.raises(ValueError, match="parameters and buffers of online"):
        mk.MomentumEncoder(online, target=nn.Linear(4, 8))
    with pytest.raises(ValueError, match="shape"):
        mk.MomentumEncoder(online, target=nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(8), nn.ReLU(),
                                                       nn.Linear(8, 3)))
    with pytest.raises(TypeError, match="target must be an nn.Module"):
        mk.MomentumEncoder(online, target=[torch.zeros(3)])
