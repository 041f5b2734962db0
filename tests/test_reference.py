"""The eager references against docs/math.md: gradchecks, independent naive oracles, and the
facts docs/math.md lists."""
import math

import pytest
import torch
import torch.nn.functional as F

from minc_kernels import reference as R

f64 = torch.float64


def _rand(*shape, seed=0, dtype=f64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=f64) * scale).to(dtype)


# ---------------------------------------------------------------- spectral
def _naive_spectral(z1, z2, mu, clip):
    """Loop-by-loop docs/math.md §1, independent of the vectorised reference."""
    b = z1.shape[0]
    r = math.sqrt(mu)

    def clipped(z):
        rows = []
        for row in z:
            n = row.norm()
            rows.append(row * (r / n) if (clip and n >= r) else row)
        return torch.stack(rows)

    a, c = clipped(z1), clipped(z2)
    pos = sum(a[i] @ c[i] for i in range(b))
    neg = sum((a[i] @ c[j]) ** 2 for i in range(b) for j in range(b) if i != j)
    return (-2.0 / b * pos + neg / (b * (b - 1))) / mu


@pytest.mark.parametrize("b,k", [(2, 3), (7, 5), (13, 4)])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("algorithm", ["pairwise", "gram", "auto"])
def test_spectral_matches_naive(b, k, clip, algorithm):
    mu = 2.0
    z1, z2 = _rand(b, k, seed=1), _rand(b, k, seed=2)
    got = R.spectral_loss(z1, z2, mu=mu, clip=clip, algorithm=algorithm)
    want = _naive_spectral(z1, z2, mu, clip)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)


def test_clip_rows_both_sides_of_threshold():
    mu = 4.0  # threshold norm 2
    z = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0]], dtype=f64)  # norms 5, 1, 0
    out = R.clip_rows(z, mu)
    torch.testing.assert_close(out[0].norm(), torch.tensor(2.0, dtype=f64))
    torch.testing.assert_close(out[1], z[1])  # below threshold: unchanged
    torch.testing.assert_close(out[2], z[2])  # zero row stays zero and finite


def test_spectral_algorithms_agree_to_rounding_fp32():
    z1, z2 = _rand(64, 48, seed=3, dtype=torch.float32), _rand(64, 48, seed=4, dtype=torch.float32)
    a = R.spectral_loss(z1, z2, algorithm="pairwise")
    b = R.spectral_loss(z1, z2, algorithm="gram")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["pairwise", "gram"])
@pytest.mark.parametrize("clip", [False, True])
def test_spectral_gradcheck(algorithm, clip):
    # scale 0.6 with k=4 puts some rows above and some below sqrt(mu)=1.
    z1 = _rand(6, 4, seed=5, scale=0.6).requires_grad_()
    z2 = _rand(6, 4, seed=6, scale=0.6).requires_grad_()
    norms = torch.cat([z1.norm(dim=1), z2.norm(dim=1)])
    assert (norms > 1.05).any() and (norms < 0.95).any()
    assert ((norms - 1).abs() > 1e-3).all()  # away from the kink
    torch.autograd.gradcheck(lambda a, b: R.spectral_loss(a, b, 1.0, clip, algorithm), (z1, z2))


def test_spectral_gram_gradient_formula():
    """docs/math.md §1: d/dZ1 of the pairwise term is 2/(B(B-1)) (Z1 Z2ᵀZ2 - diag(z1_i·z2_i) Z2)."""
    b = 9
    z1 = _rand(b, 5, seed=7).requires_grad_()
    z2 = _rand(b, 5, seed=8)
    (R.spectral_gram_term(z1, z2) / (b * (b - 1))).backward()
    diag = (z1.detach() * z2).sum(1, keepdim=True)
    want = 2.0 / (b * (b - 1)) * (z1.detach() @ (z2.T @ z2) - diag * z2)
    torch.testing.assert_close(z1.grad, want)


# ---------------------------------------------------------------- MINC
def test_minc_loss_value_and_gradient_formula():
    b, k = 7, 5
    p = _rand(b, k, seed=10).requires_grad_()
    t = _rand(b, k, seed=11)
    a = _rand(k, k, seed=12)
    m = a @ a.T
    loss = R.minc_loss(p, t, m)
    want = sum(-2 * p[i] @ t[i] + p[i] @ m @ p[i] for i in range(b)) / b
    torch.testing.assert_close(loss.double(), want.detach())
    loss.backward()
    torch.testing.assert_close(p.grad, 2.0 / b * (p.detach() @ m - t))


def test_minc_gradcheck_and_stop_gradients():
    p = _rand(5, 3, seed=13).requires_grad_()
    t = _rand(5, 3, seed=14).requires_grad_()
    a = _rand(3, 3, seed=15)
    m = (a @ a.T).requires_grad_()
    torch.autograd.gradcheck(lambda x: R.minc_loss(x, t, m), (p,))
    R.minc_loss(p, t, m).backward()
    assert t.grad is None and m.grad is None  # t and M are stop-gradient


def test_minc_gha_backward_uses_lower_triangle():
    b, k = 6, 4
    p = _rand(b, k, seed=16).requires_grad_()
    t = _rand(b, k, seed=17)
    a = _rand(k, k, seed=18)
    m = a @ a.T
    loss = R.minc_loss(p, t, m, ordering="gha")
    torch.testing.assert_close(loss, R.minc_loss(p, t, m))  # value is the bilinear value
    g = 1.7
    (loss * g).backward()
    want = g * 2.0 / b * (p.detach() @ torch.tril(m).T - t)
    torch.testing.assert_close(p.grad, want)
    # and it really differs from the symmetric gradient
    assert not torch.allclose(want, g * 2.0 / b * (p.detach() @ m - t))


def test_minc_leave_one_out_moment_gives_spectral_gradient():
    """docs/math.md §2 fact: M = leave-one-out moment of z2 per row => the spectral gradient (mu=1, no clip)."""
    b, k = 8, 5
    z1 = _rand(b, k, seed=19).requires_grad_()
    z2 = _rand(b, k, seed=20)
    R.spectral_loss(z1, z2, mu=1.0, clip=False).backward()
    g_spec = z1.grad.clone()

    z1b = z1.detach().clone().requires_grad_()
    total = 0
    full = z2.T @ z2
    for i in range(b):
        m_i = (full - torch.outer(z2[i], z2[i])) / (b - 1)
        # one-row MINC loss, weighted 1/B so it is the i-th term of the batch mean
        total = total + R.minc_loss(z1b[i:i + 1], z2[i:i + 1], m_i) / b
    total.backward()
    torch.testing.assert_close(z1b.grad, g_spec)


def test_minc_moment_and_bias_corrected_ema():
    t1, t2 = _rand(6, 3, seed=21), _rand(4, 3, seed=22)
    c1 = R.minc_batch_moment_sum(t1) / 6
    c2 = R.minc_batch_moment_sum(t2) / 4
    torch.testing.assert_close(c1.double(), (t1.T @ t1 / 6))
    beta = 0.9
    raw1, m1 = R.minc_ema_moment(torch.zeros(3, 3), c1, beta, 0)
    torch.testing.assert_close(m1, c1)  # bias correction: step 1 uses C itself
    raw2, m2 = R.minc_ema_moment(raw1, c2, beta, 1)
    want = (beta * (1 - beta) * c1 + (1 - beta) * c2) / (1 - beta**2)
    torch.testing.assert_close(m2, want)
    _, m0 = R.minc_ema_moment(torch.zeros(3, 3), c1, 0.0, 0)
    torch.testing.assert_close(m0, c1)  # beta = 0: batch moment only


# ---------------------------------------------------------------- MIO
def _naive_mio(z1, z2, tp, tn, lam):
    b, k = z1.shape
    z = torch.cat([z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)])
    n = 2 * b
    pos, neg = [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            s = z[i] @ z[j]
            (pos if j == (i + b) % n else neg).append(s)
    pos, neg = torch.stack(pos), torch.stack(neg)
    assert len(pos) == 2 * b and len(neg) == 2 * b * (2 * b - 2)
    reg = ((z[:b] - z[b:]) ** 2).sum() / (b * k)
    return F.softplus(-pos / tp).mean() + F.softplus(neg / tn).mean() + lam * reg


@pytest.mark.parametrize("b", [2, 3, 5])
@pytest.mark.parametrize("tp,tn,lam", [(0.5, 0.5, 1.0), (0.1, 0.3, 0.0), (0.05, 0.05, 2.5)])
def test_mio_matches_naive(b, tp, tn, lam):
    z1, z2 = _rand(b, 4, seed=30 + b), _rand(b, 4, seed=40 + b)
    got = R.mio_loss(z1, z2, tp, tn, lam)
    torch.testing.assert_close(got.double(), _naive_mio(z1, z2, tp, tn, lam))


def test_mio_collapsed_batch_value():
    z = torch.ones(5, 7)
    val = R.mio_loss(z, z.clone(), 0.5, 0.5, 0.0)
    assert abs(val.item() - 2.253856) < 1e-6
    assert abs(2.253856 - (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(2.0))).item()) < 1e-6


def test_mio_gradcheck():
    z1 = _rand(3, 4, seed=50).requires_grad_()
    z2 = _rand(3, 4, seed=51).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: R.mio_loss(a, b, 0.3, 0.7, 1.5), (z1, z2))


# ---------------------------------------------------------------- EMA
def test_ema_reference_formula_and_mixed_dtype():
    t = [_rand(5, seed=60, dtype=torch.float32), _rand(2, 3, seed=61, dtype=torch.float32)]
    o = [_rand(5, seed=62, dtype=torch.bfloat16), _rand(2, 3, seed=63, dtype=torch.float32)]
    want = [0.9 * a + 0.1 * b.float() for a, b in zip(t, o)]
    R.ema_update_(t, o, 0.9)
    for a, w in zip(t, want):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-6)


def test_cosine_momentum_schedule():
    assert R.cosine_momentum(0, 100) == pytest.approx(0.996)
    assert R.cosine_momentum(100, 100) == pytest.approx(1.0)
    assert R.cosine_momentum(50, 100) == pytest.approx(0.998)
    k, K = 30, 100
    assert R.cosine_momentum(k, K) == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / K) + 1) / 2)
    with pytest.raises(ValueError, match="total"):
        R.cosine_momentum(0, 0)


# ---------------------------------------------------------------- MINC feature maps (issue 12)
@pytest.mark.parametrize("feature_norm,scale", [("l2", 1.0), ("l2", 2.5), ("clip", 1.0),
                                                ("clip", 3.0), ("none", 1.0), ("none", 0.5)])
def test_minc_variants_value_and_gradcheck(feature_norm, scale):
    """Each variant = the bilinear loss on φ(p), φ(t) with M the moment of φ(t) (divided by μ
    for clip), against a hand-written oracle; gradcheck through φ in float64."""
    b, k, mu = 7, 5, 5.0
    g = torch.Generator().manual_seed(11)
    p = torch.randn(b, k, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(b, k, generator=g, dtype=torch.float64)
    # mixed row norms around √μ, so clip takes both branches
    assert ((t.norm(dim=1) > mu ** 0.5).any() and (t.norm(dim=1) < mu ** 0.5).any())

    def phi(x):
        n = x.norm(dim=1, keepdim=True)
        if feature_norm == "l2":
            return scale * x / n
        if feature_norm == "clip":
            return scale * x * torch.clamp(mu ** 0.5 / n, max=1.0)
        return scale * x

    pt, tt = phi(p), phi(t)
    m = tt.T @ tt / b
    d = mu if feature_norm == "clip" else 1.0
    want = ((-2 * (pt * tt).sum(1) + ((pt @ m) * pt).sum(1)).mean() / d)
    got = R.minc_loss(p, t, m, feature_norm=feature_norm, mu=mu, scale=scale)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(R.minc_batch_moment_sum(R.minc_features(t, feature_norm, mu, scale)) / b, m)
    torch.autograd.gradcheck(lambda x: R.minc_loss(x, t, m, feature_norm=feature_norm, mu=mu,
                                                   scale=scale), (p,))
    gp, = torch.autograd.grad(got, p)
    gw, = torch.autograd.grad(want, p)
    torch.testing.assert_close(gp, gw)
    if feature_norm == "l2" and scale == 1.0:
        assert -2.0 <= got.item() <= 1.0  # bounded, as math.md says


def test_minc_l2_variant_gha_gradient_chains_through_normalisation():
    b, k = 6, 4
    g = torch.Generator().manual_seed(12)
    p = torch.randn(b, k, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, k, generator=g, dtype=torch.float64)
    th = t / t.norm(dim=1, keepdim=True)
    m = th.T @ th / b
    R.minc_loss(p, t, m, ordering="gha", feature_norm="l2").backward()
    ph = (p / p.norm(dim=1, keepdim=True)).detach().requires_grad_()
    g_hat = 2.0 / b * (ph @ torch.tril(m).T - th)  # the GHA gradient wrt p̂
    ph_val = p / p.norm(dim=1, keepdim=True)
    want, = torch.autograd.grad(ph_val, p, g_hat)
    torch.testing.assert_close(p.grad, want)


def test_minc_corrected_moment_tensor_and_int_counts_agree():
    m = torch.rand(3, 3)
    for beta in (0.0, 0.5, 0.9, 0.999):
        for n in (0, 1, 5, 3000):
            got = R.minc_corrected_moment(m, beta, torch.tensor(n))
            torch.testing.assert_close(got, R.minc_corrected_moment(m, beta, n))
            if n >= 1:
                torch.testing.assert_close(got, m / (1 - beta ** n))
        assert torch.equal(R.minc_corrected_moment(torch.zeros(2, 2), beta, torch.tensor(0)),
                           torch.zeros(2, 2))


def test_mio_reference_runs_on_meta_tensors():
    out = R.mio_loss(torch.randn(4, 3, device="meta"), torch.randn(4, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == ()


def test_all_finite_is_exact():
    x = torch.full((3, 3), 3e38)  # finite, though its sum overflows float32
    assert R.all_finite(x).item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = torch.rand(3, 3)
        y[1, 2] = bad
        assert not R.all_finite(y).item()
    assert R.all_finite(torch.zeros(0, 4)).item()
