"""MINCLoss state safety: validated hyper-parameter assignment, a load that checks before it
changes anything, M kept in float32, one M update per step under activation checkpointing,
and compile behaviour of the stateful paths (issues 23 and 25)."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import minc_kernels as mk


def _rand(b, k, seed):
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,value,exc", [
    ("moment_momentum", 1.0, ValueError), ("moment_momentum", 1.5, ValueError),
    ("moment_momentum", "0.9", TypeError), ("mu", -1.0, ValueError), ("scale", float("nan"), ValueError),
    ("feature_norm", "l3", ValueError), ("ordering", "x", ValueError),
    ("check_finite", "maybe", ValueError), ("backend", "cuda", ValueError),
    ("bias_correction", 0.5, TypeError),
])
def test_assigned_hyper_parameters_are_checked_and_a_refusal_keeps_the_old_value(name, value, exc):
    loss = mk.MINCLoss(4)
    before = getattr(loss, name)
    with pytest.raises(exc, match=name):
        setattr(loss, name, value)
    assert getattr(loss, name) == before


def test_assignment_updates_what_depends_on_it():
    loss = mk.MINCLoss(4, feature_norm="clip")
    loss.mu = 4.0
    assert loss._divisor == 4.0
    loss.backend = "reference"
    assert loss._choice == "reference" and loss._hot[3]
    fast = mk.MINCLoss(4)
    fast.backend = "triton"  # the default-call path serves reference/auto only
    assert fast._choice == "triton" and fast._hot is None
    fast.backend = "reference"
    assert fast._hot is not None and fast._hot[3]
    p, t = _rand(6, 4, 0), _rand(6, 4, 1)
    want = mk.MINCLoss(4, feature_norm="clip", mu=4.0, backend="reference")
    torch.testing.assert_close(loss(p, t), want(p, t), rtol=0, atol=0)
    for cls, name, value in ((mk.SpectralContrastiveLoss, "mu", 0.0),
                             (mk.MIOLoss, "pos_temperature", -1.0),
                             (mk.MIOLoss, "lambda_l2", float("inf"))):
        mod = cls()
        with pytest.raises(ValueError, match=name):
            setattr(mod, name, value)


def _trained(k=4, steps=2):
    loss = mk.MINCLoss(k)
    for i in range(steps):
        loss(_rand(6, k, i), _rand(6, k, 10 + i))
    return loss


@pytest.mark.parametrize("key,value,match", [
    ("moment", torch.ones(4, 4, dtype=torch.long), "floating-point"),
    ("moment", torch.full((4, 4), float("nan")), "NaN"),
    ("moment", torch.ones(3, 3), "k=3"),
    ("moment", torch.ones(4, 5), r"shape \(k, k\)"),
    ("num_updates", torch.tensor(-5), ">= 0"),
    ("num_updates", torch.tensor(2.5), "integer"),
])
def test_a_refused_load_changes_no_state(key, value, match):
    loss = _trained()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    sd = dict(before)
    sd[key] = value
    with pytest.raises(RuntimeError, match=match):
        loss.load_state_dict(sd)
    for k, v in loss.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_refused_load_into_a_lazy_loss_keeps_it_lazy():
    loss = mk.MINCLoss()
    with pytest.raises(RuntimeError, match="NaN"):
        loss.load_state_dict({"moment": torch.full((5, 5), float("nan")), "num_updates": torch.tensor(1)})
    assert loss.dim is None and loss._lazy
    loss.load_state_dict(_trained(k=5).state_dict())
    assert loss.dim == 5 and loss.num_updates.item() == 2


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16),
                                  lambda m: m.to(dtype=torch.float16)])
def test_moment_stays_float32_under_half_casts(cast):
    loss = _trained()
    want = loss.moment.clone()
    cast(loss)
    assert loss.moment.dtype == torch.float32 and torch.equal(loss.moment, want)
    loss(_rand(6, 4, 5).to(torch.float64), _rand(6, 4, 6).to(torch.float64))  # still usable


@pytest.mark.parametrize("reentrant", [True, False])
def test_one_moment_update_per_step_under_activation_checkpointing(reentrant):
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8)
    loss, plain = mk.MINCLoss(8), mk.MINCLoss(8)
    x, t = _rand(16, 8, 0).requires_grad_(), _rand(16, 8, 1)
    for step in range(3):
        out = checkpoint(lambda inp: loss(net(inp), t), x, use_reentrant=reentrant)
        out.backward()
        got = net.weight.grad.clone()
        net.weight.grad = None
        ref = plain(net(x), t)
        ref.backward()
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(got, net.weight.grad, rtol=0, atol=0)
        net.weight.grad = None
    assert loss.num_updates.item() == plain.num_updates.item() == 3
    torch.testing.assert_close(loss.moment, plain.moment, rtol=0, atol=0)


def test_lazy_loss_under_compile_says_what_to_do():
    loss = mk.MINCLoss()
    f = torch.compile(loss, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="dim=k"):
        f(_rand(6, 4, 0), _rand(6, 4, 1))


def test_single_pair_training_compiles_once():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    loss = mk.MINCLoss(4)
    f = torch.compile(loss, fullgraph=True, backend=counter)
    for i in range(4):
        f(_rand(6, 4, i).requires_grad_(), _rand(6, 4, 10 + i))
    assert counter.frame_count == 1
    assert loss.num_updates.item() == 4


def test_torch_func_grad_runs_every_loss_on_cpu():
    """torch.func transforms cannot run the ops' torch.library autograd (issue 23): "auto"
    takes the eager reference there, which gives the same gradient."""
    z1, z2 = _rand(6, 4, 0), _rand(6, 4, 1)
    from minc_kernels import reference
    m = torch.eye(4) * 0.25
    cases = [(lambda a: mk.mio_loss(a, z2), lambda a: reference.mio_loss(a, z2)),
             (lambda a: mk.spectral_contrastive_loss(a, z2), lambda a: reference.spectral_loss(a, z2)),
             (lambda a: mk.minc_loss(a, z2, m), lambda a: reference.minc_loss(a, z2, m))]
    for fn, ref in cases:
        got = torch.func.grad(fn)(z1)
        z = z1.clone().requires_grad_()
        ref(z).backward()
        torch.testing.assert_close(got, z.grad)


def test_spectral_exports_with_a_dynamic_batch():
    """spectral's algorithm="auto" chooses on size hints, so torch.export with a dynamic batch
    does not specialise on B <= 2k (issue 23); the exported graph is exact at other sizes."""
    from torch.export import Dim, export
    loss = mk.SpectralContrastiveLoss()
    b = Dim("b", min=2, max=4096)
    ep = export(loss, (_rand(16, 8, 0), _rand(16, 8, 1)), dynamic_shapes=({0: b}, {0: b}))
    for n in (4, 64):  # pairwise-sized and gram-sized batches
        a, c = _rand(n, 8, 2), _rand(n, 8, 3)
        torch.testing.assert_close(ep.module()(a, c), loss(a, c))


@pytest.mark.parametrize("name", ["spectral", "minc", "mio", "barlow_twins", "vicreg"])
def test_every_loss_runs_inside_cpu_bf16_autocast(name):
    """The training program's CPU default is bf16 autocast around the whole step: each
    loss's module (default backend) runs forward and backward there."""
    from minc_kernels.losses import REGISTRY
    spec = REGISTRY[name]
    loss = spec.module(**spec.module_kwargs(16))
    w = torch.randn(16, 16)
    a, b = _rand(8, 16, 0).requires_grad_(), _rand(8, 16, 1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(a @ w, (b @ w) if 1 in spec.grad_args else (b @ w).detach())
    out.float().backward()
    assert torch.isfinite(out) and torch.isfinite(a.grad).all()
