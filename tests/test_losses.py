"""Loss modules: constructor checks, forward equals functional, MINC state (M) semantics."""
import os

import pytest
import torch

import minc_kernels as mk
from minc_kernels import reference as R


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_spectral_module_matches_functional_and_repr():
    loss = mk.SpectralContrastiveLoss(mu=3.0, clip=False, algorithm="gram")
    a, b = _rand(8, 5, seed=1), _rand(8, 5, seed=2)
    torch.testing.assert_close(loss(a, b), R.spectral_loss(a, b, 3.0, False, "gram"))
    assert "mu=3.0" in repr(loss) and "gram" in repr(loss)


def test_mio_module_matches_functional_and_repr():
    loss = mk.MIOLoss(pos_temperature=0.2, neg_temperature=0.3, lambda_l2=0.0)
    a, b = _rand(8, 5, seed=1), _rand(8, 5, seed=2)
    torch.testing.assert_close(loss(a, b), R.mio_loss(a, b, 0.2, 0.3, 0.0))
    assert "pos_temperature=0.2" in repr(loss)


@pytest.mark.parametrize(
    "ctor,match",
    [
        (lambda: mk.SpectralContrastiveLoss(mu=-1), "mu"),
        (lambda: mk.SpectralContrastiveLoss(backend="gpu"), "backend"),
        (lambda: mk.MIOLoss(pos_temperature=0), "pos_temperature"),
        (lambda: mk.MINCLoss(0), "dim"),
        (lambda: mk.MINCLoss(4, moment_momentum=1.5), "moment_momentum"),
        (lambda: mk.MINCLoss(4, moment_momentum=1.0), "moment_momentum"),
        (lambda: mk.MINCLoss(4, ordering="oja"), "ordering"),
    ],
)
def test_constructor_errors(ctor, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ctor()


def test_minc_first_step_uses_batch_moment_and_updates_state():
    k = 5
    loss = mk.MINCLoss(k, moment_momentum=0.9, feature_norm="none")
    p, t = _rand(7, k, seed=3).requires_grad_(), _rand(7, k, seed=4)
    out = loss(p, t)
    c = t.T @ t / 7
    torch.testing.assert_close(loss.corrected_moment(), c)
    torch.testing.assert_close(out, R.minc_loss(p, t, c))
    assert loss.num_updates.item() == 1
    out.backward()
    torch.testing.assert_close(p.grad, 2.0 / 7 * (p.detach() @ c - t))

    t2 = _rand(5, k, seed=5)
    loss(_rand(5, k, seed=6), t2)
    c2 = t2.T @ t2 / 5
    want = (0.9 * 0.1 * c + 0.1 * c2) / (1 - 0.81)
    torch.testing.assert_close(loss.corrected_moment(), want)


def test_minc_eval_leaves_moment_unchanged():
    loss = mk.MINCLoss(4, feature_norm="none")
    loss(_rand(6, 4, seed=7), _rand(6, 4, seed=8))
    before = loss.moment.clone(), loss.num_updates.clone()
    loss.eval()
    p = _rand(6, 4, seed=9)
    out = loss(p, _rand(6, 4, seed=10))
    assert torch.equal(loss.moment, before[0]) and torch.equal(loss.num_updates, before[1])
    torch.testing.assert_close(out, R.minc_loss(p, _rand(6, 4, seed=10), loss.corrected_moment()))


def test_minc_state_dict_round_trip():
    a = mk.MINCLoss(4, moment_momentum=0.5)
    for s in range(3):
        a(_rand(6, 4, seed=s), _rand(6, 4, seed=s + 10))
    sd = a.state_dict()
    assert set(sd) == {"moment", "num_updates"} and sd["moment"].dtype == torch.float32
    b = mk.MINCLoss(4, moment_momentum=0.5)
    b.load_state_dict(sd)
    torch.testing.assert_close(b.corrected_moment(), a.corrected_moment())
    p, t = _rand(6, 4, seed=20), _rand(6, 4, seed=21)
    torch.testing.assert_close(a(p, t), b(p, t))


def test_minc_symmetric_call():
    k = 4
    loss = mk.MINCLoss(k, moment_momentum=0.0, feature_norm="none")
    p1, p2 = _rand(6, k, seed=1), _rand(6, k, seed=2)
    t1, t2 = _rand(6, k, seed=3), _rand(6, k, seed=4)
    out, parts = loss((p1, p2), (t2, t1), return_parts=True)
    c = (t1.T @ t1 + t2.T @ t2) / 12  # one update, C averaged over both targets
    torch.testing.assert_close(loss.corrected_moment(), c)
    assert loss.num_updates.item() == 1
    torch.testing.assert_close(out, R.minc_loss(p1, t2, c) + R.minc_loss(p2, t1, c))
    torch.testing.assert_close(parts["cross"] + parts["cov"], out)
    torch.testing.assert_close(parts["cross"], -2 * ((p1 * t2).sum() + (p2 * t1).sum()) / 6)
    with pytest.raises(ValueError, match="same number"):
        loss((p1, p2), (t2,))


def test_minc_target_never_gets_gradient():
    loss = mk.MINCLoss(3)
    p = _rand(5, 3, seed=1).requires_grad_()
    t = _rand(5, 3, seed=2).requires_grad_()
    loss(p, t).backward()
    assert p.grad is not None and t.grad is None


def test_minc_gha_ordering_gradient():
    loss = mk.MINCLoss(4, moment_momentum=0.0, ordering="gha", feature_norm="none")
    p, t = _rand(6, 4, seed=1).requires_grad_(), _rand(6, 4, seed=2)
    loss(p, t).backward()
    c = t.T @ t / 6
    torch.testing.assert_close(p.grad, 2.0 / 6 * (p.detach() @ torch.tril(c).T - t))


def test_minc_bad_input_changes_no_state():
    loss = mk.MINCLoss(4, check_finite="raise")
    loss(_rand(6, 4, seed=1), _rand(6, 4, seed=2))
    snap = {k: v.clone() for k, v in loss.state_dict().items()}

    def unchanged():
        return all(torch.equal(v, loss.state_dict()[k]) for k, v in snap.items())

    bad_t = _rand(6, 4, seed=3)
    bad_t[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss(_rand(6, 4, seed=4), bad_t)
    assert unchanged()
    inf_t = _rand(6, 4, seed=3)
    inf_t[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss(_rand(6, 4, seed=4), inf_t)
    assert unchanged()
    with pytest.raises(ValueError, match=r"k=4"):
        loss(_rand(6, 5, seed=4), _rand(6, 5, seed=5))
    with pytest.raises(ValueError, match="same shape"):
        loss(_rand(6, 4, seed=4), _rand(5, 4, seed=5))
    with pytest.raises(TypeError, match="floating"):
        loss(torch.ones(6, 4, dtype=torch.int32), torch.ones(6, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shape \(B, k\)"):
        loss(_rand(6, 4, 1, seed=4), _rand(6, 4, 1, seed=5))
    # second view bad: the first view's moment must not have been applied either
    with pytest.raises(ValueError):
        loss((_rand(6, 4, seed=4), _rand(6, 3, seed=4)), (_rand(6, 4, seed=5), _rand(6, 3, seed=5)))
    assert unchanged()
    # opt-out: the caller accepts non-finite state
    loss_nocheck = mk.MINCLoss(4, check_finite=False)
    loss_nocheck(_rand(6, 4, seed=4), bad_t)
    assert torch.isnan(loss_nocheck.moment).any()


def test_minc_module_moves_with_to():
    loss = mk.MINCLoss(3).to(torch.float64)  # buffers follow .to like any module
    assert loss.moment.dtype == torch.float64
    loss = mk.MINCLoss(3)
    with pytest.raises(ValueError, match="moment is on"):
        loss(torch.randn(4, 3, device="meta"), torch.randn(4, 3, device="meta"))


def test_first_call_under_compile_fullgraph_in_a_fresh_process():
    """TorchDynamo cannot trace the lazy import of an op module: each loss loads its op in
    its constructor, so the very first call of a fullgraph-compiled loss works."""
    import subprocess
    import sys
    import textwrap
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch, minc_kernels as mk
        torch.manual_seed(0)
        for cls, args in [(mk.SpectralContrastiveLoss, ()), (mk.MIOLoss, ()), (mk.MINCLoss, (8,))]:
            eager, fn = cls(*args, backend="reference"), cls(*args, backend="triton")
            z1 = torch.randn(6, 8, requires_grad=True)
            z2 = torch.randn(6, 8)
            got = torch.compile(fn, fullgraph=True, backend="eager")(z1, z2)
            want = eager(z1.detach(), z2)
            torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
            got.backward()
            assert z1.grad is not None and torch.isfinite(z1.grad).all()
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


# ---------------------------------------------------------------- feature maps (issue 12)
VARIANTS = [dict(feature_norm="l2"), dict(feature_norm="l2", scale=2.0),
            dict(feature_norm="clip", mu=2.0), dict(feature_norm="none")]


def test_minc_default_variant_is_the_documented_constant():
    assert mk.MINCLoss(4).feature_norm == mk.losses.MINC_DEFAULT_FEATURE_NORM == "l2"


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_minc_module_variants_match_reference(kw):
    """Two training steps of the module = the reference composition: M is the EMA of the
    moments of φ(t), the loss and its gradient those of R.minc_loss on the same M."""
    k, beta = 5, 0.8
    loss = mk.MINCLoss(k, moment_momentum=beta, **kw)
    raw = torch.zeros(k, k)
    for step in range(2):
        p = (2.0 * _rand(9, k, seed=30 + step)).requires_grad_()
        t = 2.0 * _rand(9, k, seed=40 + step)
        out = loss(p, t)
        tm = R.minc_features(t, kw["feature_norm"], kw.get("mu", 1.0), kw.get("scale", 1.0))
        raw, m = R.minc_ema_moment(raw, R.minc_batch_moment_sum(tm) / 9, beta, step)
        torch.testing.assert_close(loss.corrected_moment(), m)
        ref_p = p.detach().clone().requires_grad_()
        want = R.minc_loss(ref_p, t, m, **kw)
        torch.testing.assert_close(out, want)
        out.backward()
        want.backward()
        torch.testing.assert_close(p.grad, ref_p.grad)
        # the functional form with the same M agrees too
        torch.testing.assert_close(mk.minc_loss(p.detach(), t, m, **kw), want.detach())


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("ordering", ["standard", "gha"])
def test_minc_variants_triton_path_matches_reference(kw, ordering):
    """The Triton op (interpreted on the CPU) receives the mapped rows: same value, same
    gradient through φ, same M as the reference backend."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    k = 6
    fast = mk.MINCLoss(k, moment_momentum=0.5, ordering=ordering, backend="triton", **kw)
    ref = mk.MINCLoss(k, moment_momentum=0.5, ordering=ordering, backend="reference", **kw)
    for step in range(2):
        p = (1.7 * _rand(11, k, seed=50 + step)).requires_grad_()
        p_ref = p.detach().clone().requires_grad_()
        t = 1.7 * _rand(11, k, seed=60 + step)
        a, b = fast((p, p * 0.5), (t, t.flip(0))), ref((p_ref, p_ref * 0.5), (t, t.flip(0)))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        a.backward()
        b.backward()
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.moment, ref.moment, rtol=1e-5, atol=1e-6)


def test_minc_variant_argument_errors():
    with pytest.raises(ValueError, match="feature_norm"):
        mk.MINCLoss(4, feature_norm="cosine")
    with pytest.raises((ValueError, TypeError), match="scale"):
        mk.MINCLoss(4, scale=0)
    with pytest.raises((ValueError, TypeError), match="mu"):
        mk.MINCLoss(4, feature_norm="clip", mu=-1.0)
    with pytest.raises(ValueError, match="feature_norm"):
        mk.minc_loss(torch.randn(3, 2), torch.randn(3, 2), torch.eye(2), feature_norm="l1")


# ---------------------------------------------------------------- drop-in ergonomics (issue 13)
def test_minc_infers_dim_lazily_and_state_dict_round_trips():
    loss = mk.MINCLoss(moment_momentum=0.5)
    assert loss.dim is None and "dim=None" in repr(loss)
    p, t = _rand(6, 5, seed=1), _rand(6, 5, seed=2)
    loss(p, t)
    assert loss.dim == 5 and loss.moment.shape == (5, 5) and loss.moment.dtype == torch.float32
    ref = mk.MINCLoss(5, moment_momentum=0.5)
    ref(p, t)
    torch.testing.assert_close(loss.moment, ref.moment)
    with pytest.raises(ValueError, match="k=5"):
        loss(_rand(6, 4), _rand(6, 4))
    # a lazy loss takes its size from a checkpoint, and continues identically
    fresh = mk.MINCLoss(moment_momentum=0.5)
    fresh.load_state_dict(loss.state_dict())
    assert fresh.dim == 5 and fresh.num_updates.item() == 1
    p2, t2 = _rand(6, 5, seed=3), _rand(6, 5, seed=4)
    torch.testing.assert_close(fresh(p2, t2), loss(p2, t2))
    # explicit dim and a lazy module move with .to like any module
    lazy64 = mk.MINCLoss().to(torch.float64)
    lazy64(_rand(3, 2), _rand(3, 2))
    assert lazy64.moment.dtype == torch.float64 and lazy64.moment.shape == (2, 2)


def test_minc_lazy_state_dict_keys_and_bad_checkpoint():
    a = mk.MINCLoss()
    a(_rand(4, 3), _rand(4, 3))
    assert set(a.state_dict()) == {"moment", "num_updates"}
    with pytest.raises(RuntimeError, match=r"\(k, k\)"):
        mk.MINCLoss().load_state_dict({"moment": torch.zeros(3, 4), "num_updates": torch.tensor(1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        mk.MINCLoss(4).load_state_dict(a.state_dict())


def test_minc_dim_is_not_an_axis_message():
    loss = mk.MINCLoss(dim=1)  # lightly's NegativeCosineSimilarity(dim=1) habit
    with pytest.raises(ValueError, match="k=1"):
        loss(_rand(4, 8), _rand(4, 8))


def test_minc_swapped_arguments_named_at_forward():
    loss = mk.MINCLoss()
    z = _rand(6, 4).requires_grad_()      # an online projection (carries grad)
    target = _rand(6, 4)                  # a target (no grad)
    with pytest.raises(ValueError, match="swapped"):
        loss(target, z)
    assert loss.num_updates.item() == 0  # refused before any state change
    loss(z, target)  # the right order works
    with torch.no_grad():
        loss(target, z)  # no autograd, nothing to swap


def test_minc_two_calls_per_step_are_two_ema_updates_symmetric_form_is_one():
    """lightly's 0.5*(c(p0,z1)+c(p1,z0)) = two EMA steps (documented); the tuple form = one
    step with C averaged over both targets."""
    k, beta = 4, 0.9
    p0, p1, z0, z1 = (_rand(6, k, seed=s) for s in range(4))
    two = mk.MINCLoss(k, moment_momentum=beta, feature_norm="none", bias_correction=False)
    0.5 * (two(p0, z1) + two(p1, z0))
    c0, c1 = z0.T @ z0 / 6, z1.T @ z1 / 6
    assert two.num_updates.item() == 2
    torch.testing.assert_close(two.moment, beta * (1 - beta) * c1 + (1 - beta) * c0)
    one = mk.MINCLoss(k, moment_momentum=beta, feature_norm="none", bias_correction=False)
    out = 0.5 * one((p0, p1), (z1, z0))
    assert one.num_updates.item() == 1
    torch.testing.assert_close(one.moment, (1 - beta) * (c0 + c1) / 2)
    m = one.moment
    torch.testing.assert_close(out, 0.5 * (R.minc_loss(p0, z1, m) + R.minc_loss(p1, z0, m)))


@pytest.mark.parametrize("pd,td", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                   (torch.float16, torch.bfloat16)])
def test_minc_mixed_dtypes_promote(pd, td):
    want_dtype = torch.promote_types(pd, td)
    p = _rand(6, 4, seed=1).to(pd).requires_grad_()
    t = _rand(6, 4, seed=2).to(td)
    out = mk.MINCLoss(4)(p, t)
    p_ref = p.detach().to(want_dtype).requires_grad_()
    want = mk.MINCLoss(4)(p_ref, t.to(want_dtype))
    torch.testing.assert_close(out, want)
    out.backward()
    want.backward()
    assert p.grad.dtype == pd
    torch.testing.assert_close(p.grad, p_ref.grad.to(pd))


def test_minc_eval_before_training_warns_once():
    loss = mk.MINCLoss(4).eval()
    with pytest.warns(RuntimeWarning, match="never updated"):
        loss(_rand(5, 4), _rand(5, 4))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(_rand(5, 4), _rand(5, 4))  # once
        trained = mk.MINCLoss(4)
        trained(_rand(5, 4), _rand(5, 4))
        trained.eval()(_rand(5, 4), _rand(5, 4))  # updated: no warning
        loaded = mk.MINCLoss(4)
        loaded.load_state_dict(trained.state_dict())
        loaded.eval()(_rand(5, 4), _rand(5, 4))  # loaded: no warning


def test_minc_non_finite_target_skipped_on_device_by_default():
    loss = mk.MINCLoss(4)
    loss(_rand(6, 4, seed=1), _rand(6, 4, seed=2))
    snap = loss.moment.clone()
    bad = _rand(6, 4, seed=3)
    bad[1, 2] = float("inf")
    loss(_rand(6, 4, seed=4), bad)  # no error, M and the count unchanged, the skip counted
    assert torch.equal(loss.moment, snap)
    assert loss.num_updates.item() == 1 and loss.nonfinite_skips.item() == 1
    loss(_rand(6, 4, seed=5), _rand(6, 4, seed=6))
    assert loss.num_updates.item() == 2 and loss.nonfinite_skips.item() == 1
    assert "nonfinite_skips" not in loss.state_dict()
    with pytest.raises(ValueError, match="check_finite"):
        mk.MINCLoss(4, check_finite="warn")


@pytest.mark.parametrize(
    "ctor,match",
    [
        (lambda: mk.SpectralContrastiveLoss(mu="1"), "mu"),
        (lambda: mk.SpectralContrastiveLoss(mu=True), "mu"),
        (lambda: mk.MINCLoss(4, moment_momentum="0.9"), "moment_momentum"),
        (lambda: mk.MIOLoss(lambda_l2="1"), "lambda_l2"),
        (lambda: mk.MIOLoss(temperature="0.1"), "temperature"),
        (lambda: mk.MIOLoss(temperature=0.1, pos_temperature=0.2), "temperature"),
        (lambda: mk.MIOLoss(temperature=0.1, neg_temperature=0.3), "temperature"),
    ],
)
def test_hyper_parameters_must_be_numbers(ctor, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ctor()


def test_numeric_hyper_parameters_still_accepted():
    import numpy as np
    assert mk.SpectralContrastiveLoss(mu=np.float32(2.0)).mu == 2.0
    assert mk.SpectralContrastiveLoss(mu=torch.tensor(3.0)).mu == 3.0
    assert mk.SpectralContrastiveLoss(mu=2).mu == 2.0


def test_mio_temperature_sets_both():
    a, b = _rand(8, 5, seed=1), _rand(8, 5, seed=2)
    loss = mk.MIOLoss(temperature=0.2)
    assert loss.pos_temperature == loss.neg_temperature == 0.2
    torch.testing.assert_close(loss(a, b), R.mio_loss(a, b, 0.2, 0.2, 1.0))
    assert mk.MIOLoss(0.2, temperature=0.2).neg_temperature == 0.2  # same value: fine
    assert mk.MIOLoss().pos_temperature == 0.5


def test_mio_on_meta_tensors():
    out = mk.MIOLoss()(torch.randn(6, 4, device="meta"), torch.randn(6, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == ()


def test_explicit_triton_that_cannot_be_honoured_raises():
    with pytest.raises(ValueError, match="triton"):
        mk.MIOLoss(backend="triton", gather_distributed=True)
    with pytest.raises(ValueError, match="triton"):
        mk.SpectralContrastiveLoss(backend="triton", gather_distributed=True, dist_comm="gram")
    with pytest.raises(ValueError, match="triton"):
        mk.mio_loss(_rand(4, 3), _rand(4, 3), backend="triton", gather_distributed=True)
    mk.SpectralContrastiveLoss(backend="triton", gather_distributed=True)  # auto: gathers
    mk.MIOLoss(backend="auto", gather_distributed=True)


def test_backend_env_var_read_at_construction(monkeypatch):
    monkeypatch.setenv("MINC_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MINC_KERNELS_BACKEND"):
        mk.MINCLoss(4)
    monkeypatch.setenv("MINC_KERNELS_BACKEND", "reference")
    loss = mk.MINCLoss(4)
    monkeypatch.setenv("MINC_KERNELS_BACKEND", "fastest")
    loss(_rand(4, 4), _rand(4, 4))  # validated once, at construction


@pytest.mark.parametrize("check_finite", ["skip", "raise", "ignore", True, False])
def test_minc_check_finite_modes_agree_on_finite_input_any_dtype(check_finite):
    """Every mode gives the same M on finite input, whether M or the inputs are float64."""
    want = mk.MINCLoss(3, check_finite="ignore")
    want(_rand(5, 3, seed=1), _rand(5, 3, seed=2))
    for module_dtype, input_dtype in [(torch.float32, torch.float32), (torch.float64, torch.float32),
                                      (torch.float32, torch.float64)]:
        loss = mk.MINCLoss(3, check_finite=check_finite).to(module_dtype)
        out = loss(_rand(5, 3, seed=1).to(input_dtype), _rand(5, 3, seed=2).to(input_dtype))
        assert out.dtype == input_dtype and loss.moment.dtype == module_dtype
        torch.testing.assert_close(loss.moment.float(), want.moment)
        assert loss.num_updates.item() == 1


def test_symmetric_minc_step_chooses_the_backend_once_and_checks_each_tensor_once(monkeypatch):
    """Issue 16: the backend is validated at construction, the tensor-dependent choice is
    made once per call, and each argument is checked once."""
    from minc_kernels import _backend
    from minc_kernels.losses import minc as losses
    calls = {"requested": 0, "select": 0, "check_features": 0}

    def counting(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    loss = mk.MINCLoss(4)
    monkeypatch.setattr(losses, "requested_backend", counting("requested", _backend.requested_backend))
    monkeypatch.setattr(losses, "select", counting("select", _backend.select))
    import minc_kernels._validation as V
    monkeypatch.setattr(V, "check_features", counting("check_features", V.check_features))
    p1, p2 = _rand(6, 4, seed=1).requires_grad_(), _rand(6, 4, seed=2).requires_grad_()
    loss((p1, p2), (_rand(6, 4, seed=3), _rand(6, 4, seed=4))).backward()
    assert calls == {"requested": 0, "select": 1, "check_features": 4}, calls


def test_minc_eval_no_warning_when_moment_was_written_directly():
    import warnings
    loss = mk.MINCLoss(3, bias_correction=False)
    with torch.no_grad():
        loss.moment.copy_(torch.eye(3))
        loss.num_updates.fill_(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss.eval()(_rand(4, 3), _rand(4, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(feature_norm="l2"), dict(feature_norm="clip", mu=2.0)],
                         ids=["l2", "clip"])
def test_minc_variants_triton_half_error_within_3x_of_eager(dtype, kw):
    """Half inputs: the Triton path's error against a float64 oracle (same module math on
    float64 copies) is at most 3x eager's in the same dtype (DESIGN.md's bar)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    k = 33
    p = (1.5 * _rand(37, k, seed=70)).to(dtype)
    t = (1.5 * _rand(37, k, seed=71)).to(dtype)

    def run(backend, dtype_in):
        loss = mk.MINCLoss(k, moment_momentum=0.5, backend=backend, **kw)
        x = p.to(dtype_in).requires_grad_()
        out = loss(x, t.to(dtype_in))
        out.backward()
        return out.detach().double(), x.grad.double()

    want = run("reference", torch.float64)
    got, eager = run("triton", dtype), run("reference", dtype)
    eps = torch.finfo(dtype).eps
    for name, a, e, w in zip(("loss", "dp"), got, eager, want):
        err, err_eager = float((a - w).abs().max()), float((e - w).abs().max())
        floor = 0.5 * eps * float(w.abs().max())
        assert err <= 3 * err_eager + floor, (name, err, err_eager, floor)


# ----------------------------------------------------------------- the default call's fast path
# (issue 13: MINCLoss.forward runs the default call, one fp32 pair on the CPU/reference path,
# as one straight line; these pin it to the general path bit for bit and cap its op count.)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def _same_or_both_nan(x, y):
    return torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())


@pytest.mark.parametrize("kw", [dict(feature_norm="none"), dict(feature_norm="l2"),
                                dict(feature_norm="clip", mu=2.0), dict(feature_norm="l2", scale=2.0),
                                dict(feature_norm="none", moment_momentum=0.3)],
                         ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("b,k", [(1, 3), (7, 5), (64, 16)])
def test_fast_path_is_bit_for_bit_the_general_path(kw, b, k):
    """loss(p, t) takes the straight-line fast path of forward; loss([p], [t]) takes
    _forward.  Loss, gradient and state must agree exactly, over training steps, a step
    with a NaN target (skipped on the device) and an eval step."""
    torch.manual_seed(0)
    fast, general = mk.MINCLoss(k, **kw), mk.MINCLoss(k, **kw)
    for step in range(5):
        p, t = torch.randn(b, k) * 3, torch.randn(b, k)
        if step == 2:
            t[0, -1] = float("nan")
        if step == 4:
            fast.eval(), general.eval()
        out = []
        for loss, wrap in ((fast, lambda x: x), (general, lambda x: [x])):
            pp = p.clone().requires_grad_()
            value = loss(wrap(pp), wrap(t))
            value.backward()
            out.append((value.detach(), pp.grad, loss.moment.clone(), loss.num_updates.clone(),
                        loss.nonfinite_skips.clone()))
        for x, y in zip(*out):
            assert _same_or_both_nan(x, y), (step, x, y)
    assert int(fast.nonfinite_skips) == 1 and int(fast.num_updates) == 3


def test_fast_path_follows_a_changed_configuration():
    """The fast path's constants are recomputed when a setting is assigned after construction."""
    loss = mk.MINCLoss(4, feature_norm="none")
    p, t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    t[0, 0] = float("nan")
    loss.check_finite = "raise"
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss(p, t)
    loss.check_finite = "skip"
    loss(p, t)
    assert int(loss.nonfinite_skips) == 1 and int(loss.num_updates) == 0


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("feature_norm,most", [("none", 37), ("l2", 65)])
def test_default_step_aten_calls(feature_norm, most):
    """CPU overhead (issue 13): each aten call costs microseconds on the CPU.  A default
    training step (fwd+bwd, B=64, k=16) makes 11 aten calls more than the hand-written eager
    loss of benchmarks/cpu_overhead.py (26 for 'none', 50 for 'l2'): the on-device
    finite check (3), the skip (where), the two counters (3), the bias correction of
    reference.minc_corrected_moment (4); 'l2' makes 4 more for the overflow guard of its row
    map (losses.minc.l2_rows: ``+ n·0`` on p and t, issue 25).  The code before the fast
    path made 43 and 67."""
    loss = mk.MINCLoss(16, feature_norm=feature_norm)
    p, t = torch.randn(64, 16, requires_grad=True), torch.randn(64, 16)
    loss(p, t).backward()
    p.grad = None
    with _Count() as c:
        loss(p, t).backward()
    assert c.n <= most, c.n
