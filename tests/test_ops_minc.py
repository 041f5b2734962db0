"""Triton MINC kernels (minc_kernels.ops.minc) against reference.py.

Runs under TRITON_INTERPRET=1 on the CPU (conftest), on CUDA when present.  Tiny shapes;
every comparison is against a float64 oracle with a random upstream gradient.  k=33 with
the interpreter's 16-wide tiles puts GHA reduction tiles fully inside, straddling and fully
outside the lower triangle.
"""
import pytest
import torch

pytest.importorskip("triton")

from minc_kernels import reference  # noqa: E402
from minc_kernels import functional as Fn  # noqa: E402
from minc_kernels.ops import configs, gram  # noqa: E402
from minc_kernels.ops import minc as ops  # noqa: E402


def _inputs(b, k, dtype, device, seed=0, noncontig=False):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(b, k, generator=gen, dtype=torch.float64)
    t = torch.randn(b, k, generator=gen, dtype=torch.float64)
    f = torch.randn(3 * k + 1, k, generator=gen, dtype=torch.float64)
    m = (f.T @ f / f.shape[0]).float()  # a symmetric moment, as MINCLoss builds
    p, t = p.to(dtype), t.to(dtype)
    if noncontig:
        p = p.T.contiguous().T
        t = torch.cat([t, t], dim=1)[:, 1::2]
        m = m.T.contiguous().T  # symmetric values, transposed strides
        assert not (p.is_contiguous() or t.is_contiguous())
    return p.to(device).requires_grad_(), t.to(device), m.to(device)


def _oracle(p, t, m, ordering, g):
    p64 = p.detach().cpu().double().requires_grad_()
    loss = reference.minc_loss(p64, t.cpu().double(), m.cpu().double(), ordering)
    (gp,) = torch.autograd.grad(loss * g, p64)
    return loss.detach(), gp


def _run(fn, p, t, m, g):
    loss = fn(p, t, m)
    (gp,) = torch.autograd.grad(loss * g, p)
    return loss.detach().cpu().double(), gp.cpu().double()


def _kernel(ordering):
    return lambda p, t, m: ops.minc_loss(p, t, m, ordering)


def _assert_close_fp32(got, want):
    for a, w in zip(got, want):
        assert float((a - w).abs().max()) <= 2e-6 * float(w.abs().max()) + 1e-7


@pytest.mark.parametrize("b,k", [(1, 5), (2, 5), (7, 33), (37, 5)])
@pytest.mark.parametrize("ordering", ["standard", "gha"])
def test_fp32_matches_float64_oracle(kernel_device, b, k, ordering):
    p, t, m = _inputs(b, k, torch.float32, kernel_device)
    _assert_close_fp32(_run(_kernel(ordering), p, t, m, -1.3), _oracle(p, t, m, ordering, -1.3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ordering", ["standard", "gha"])
@pytest.mark.parametrize("b,k", [(7, 33), (37, 5)])
def test_half_error_within_3x_of_eager(kernel_device, dtype, ordering, b, k):
    p, t, m = _inputs(b, k, dtype, kernel_device, seed=1)
    g = 0.7
    want = _oracle(p, t, m, ordering, g)
    got = _run(_kernel(ordering), p, t, m, g)
    eager = _run(lambda a, c, d: reference.minc_loss(a, c, d, ordering), p, t, m, g)
    eps = torch.finfo(dtype).eps
    for name, a, e, w in zip(("loss", "dp"), got, eager, want):
        err, err_eager = float((a - w).abs().max()), float((e - w).abs().max())
        # The loss is fp32 from exact half inputs: its floor is fp32's, not the half dtype's.
        floor_eps = torch.finfo(torch.float32).eps if name == "loss" else eps
        floor = 0.5 * floor_eps * float(w.abs().max()) * (k if name == "loss" else 1)
        assert err <= 3 * err_eager + floor, (name, err, err_eager, floor)


def test_gha_gradient_differs_and_loss_does_not(kernel_device):
    p, t, m = _inputs(7, 33, torch.float32, kernel_device, seed=2)
    std = _run(_kernel("standard"), p, t, m, 1.0)
    gha = _run(_kernel("gha"), p, t, m, 1.0)
    assert torch.equal(std[0], gha[0])
    assert float((std[1] - gha[1]).abs().max()) > 1e-2 * float(std[1].abs().max())
    # gha gradient is (2/B)(LT(M) p - t), checked directly in float64
    pd, td, md = p.detach().cpu().double(), t.cpu().double(), m.cpu().double()
    want = (2.0 / 7) * (pd @ torch.tril(md).T - td)
    assert float((gha[1] - want).abs().max()) <= 2e-6 * float(want.abs().max())


@pytest.mark.parametrize("tiles", [(16, 32, 16), (32, 16, 32), (16, 16, 32)])
def test_gha_with_rectangular_tiles(kernel_device, monkeypatch, tiles):
    """The GPU tiles have BLOCK_K != BLOCK_N: the inside/straddling/outside tile tests of the
    lower triangle must hold for any shape, not only for the interpreter's square tiles."""
    bm, bn, bk = tiles
    monkeypatch.setattr(configs, "rowmat_config",
                        lambda k, *a, **kw: configs.KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                                 num_warps=4))
    p, t, m = _inputs(7, 70, torch.float32, kernel_device, seed=12)
    _assert_close_fp32(_run(_kernel("gha"), p, t, m, 1.1), _oracle(p, t, m, "gha", 1.1))


@pytest.mark.parametrize("ordering", ["standard", "gha"])
def test_noncontiguous_inputs(kernel_device, ordering):
    p, t, m = _inputs(7, 33, torch.float32, kernel_device, seed=3, noncontig=True)
    _assert_close_fp32(_run(_kernel(ordering), p, t, m, 0.4), _oracle(p, t, m, ordering, 0.4))


@pytest.mark.parametrize("ordering", ["standard", "gha"])
def test_deterministic_bits(kernel_device, ordering):
    p, t, m = _inputs(37, 33, torch.float32, kernel_device, seed=4)
    a = _run(_kernel(ordering), p, t, m, 1.0)
    b = _run(_kernel(ordering), p, t, m, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(ops.moment_sum(t), ops.moment_sum(t))


def test_no_grad_path_same_loss(kernel_device):
    p, t, m = _inputs(7, 33, torch.float32, kernel_device, seed=5)
    loss, grad = ops.minc_loss_fwd(p.detach(), t, m, False, False)
    assert grad.numel() == 0
    with_grad = ops.minc_loss(p, t, m, "standard")
    assert torch.equal(loss, with_grad.detach())
    with torch.no_grad():
        assert torch.equal(ops.minc_loss(p, t, m, "standard"), loss)


def test_backward_without_saved_gradient_raises(kernel_device):
    p, t, m = _inputs(7, 5, torch.float32, kernel_device)
    loss, _ = ops.minc_loss_fwd(p, t, m, False, False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.backward()


@pytest.mark.parametrize("b,k", [(1, 5), (37, 5), (7, 33), (100, 3), (50, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_moment_sum(kernel_device, b, k, dtype):
    # (37, 5), (100, 3) and (50, 20) split the rows over several programs (partials summed
    # after); (7, 33) and (50, 20) have off-diagonal (mirrored) tiles
    _, t, _ = _inputs(b, k, dtype, kernel_device, seed=6)
    got = ops.moment_sum(t)
    assert got.dtype == torch.float32 and got.shape == (k, k) and not got.requires_grad
    want = reference.minc_batch_moment_sum(t.cpu().double())
    # half inputs are exact; products exact in fp32: only fp32 accumulation error remains
    tol = 4 * b * torch.finfo(torch.float32).eps * float(want.abs().max())
    assert float((got.cpu().double() - want).abs().max()) <= tol


@pytest.mark.parametrize("b,k", [(50, 20), (7, 33), (1, 3)])
def test_gram_dot(kernel_device, b, k):
    """<G, XᵀX>_F reduced tile by tile (mirrored tiles counted twice, row slices summed)."""
    _, t, m = _inputs(b, k, torch.float32, kernel_device, seed=13)
    got = float(gram.gram_dot(t, m))
    want = float((m.cpu().double() * reference.minc_batch_moment_sum(t.cpu().double())).sum())
    assert abs(got - want) <= 1e-5 * abs(want)


def test_moment_sum_noncontiguous(kernel_device):
    _, t, _ = _inputs(37, 33, torch.float32, kernel_device, seed=7, noncontig=True)
    want = reference.minc_batch_moment_sum(t.cpu().double())
    got = ops.moment_sum(t).cpu().double()
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_functional_triton_backend(kernel_device):
    p, t, m = _inputs(7, 5, torch.float32, kernel_device, seed=8)
    got = Fn.minc_loss(p, t, m, ordering="gha", backend="triton")
    want = reference.minc_loss(p.detach().cpu().double(), t.cpu().double(), m.cpu().double(), "gha")
    assert abs(float(got.detach()) - float(want)) <= 2e-6 * abs(float(want))
    mom = Fn.minc_moment_sum(t, backend="triton")
    assert torch.allclose(mom.cpu().double(), reference.minc_batch_moment_sum(t.cpu().double()),
                          rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gha", [False, True])
def test_opcheck(kernel_device, gha):
    p, t, m = _inputs(7, 5, torch.float32, kernel_device, seed=9)
    torch.library.opcheck(ops.minc_loss_fwd, (p, t, m, gha, True))
    torch.library.opcheck(ops.minc_loss_fwd, (p.detach(), t, m, gha, False))
    if not gha:
        torch.library.opcheck(ops.minc_moment_sum, (t,))


def test_torch_compile_fullgraph(kernel_device):
    Fn.load_kernels("triton")  # functional form: import the op outside the compiled region

    def f(p, t, m):
        c = Fn.minc_moment_sum(t, backend="triton") / t.shape[0]
        return Fn.minc_loss(p, t, 0.5 * (m + c), ordering="gha", backend="triton")

    p, t, m = _inputs(7, 5, torch.float32, kernel_device, seed=10)
    torch._dynamo.reset()
    got = _run(torch.compile(f, fullgraph=True), p, t, m, 0.9)
    want = _run(f, p, t, m, 0.9)
    for x, y in zip(got, want):
        assert float((x - y).abs().max()) <= 1e-6 * float(y.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("b,k", [(4096, 256), (256, 2048), (1031, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ordering", ["standard", "gha"])
def test_gpu_large_shapes(b, k, dtype, ordering):
    p, t, m = _inputs(b, k, dtype, torch.device("cuda"), seed=11)
    g = 1.2
    want = _oracle(p, t, m, ordering, g)
    got = _run(_kernel(ordering), p, t, m, g)
    if dtype == torch.float32:
        for a, w in zip(got, want):
            assert float((a - w).abs().max()) <= 1e-5 * float(w.abs().max())
    else:
        eager = _run(lambda a, c, d: reference.minc_loss(a, c, d, ordering), p, t, m, g)
        eps = torch.finfo(dtype).eps
        for name, a, e, w in zip(("loss", "dp"), got, eager, want):
            err, err_eager = float((a - w).abs().max()), float((e - w).abs().max())
            floor_eps = torch.finfo(torch.float32).eps if name == "loss" else eps
            floor = 0.5 * floor_eps * float(w.abs().max()) * (k if name == "loss" else 1)
            assert err <= 3 * err_eager + floor, (name, err, err_eager, floor)
    mom = ops.moment_sum(t)
    want_m = reference.minc_batch_moment_sum(t.cpu().double())
    assert float((mom.cpu().double() - want_m).abs().max()) <= 1e-5 * float(want_m.abs().max())


# --------------------------------------------------------------------------- MINCLoss's step
def _module_oracle(ps, ts, steps_beta=0.9):
    """MINCLoss's default training call in float64 (reference backend): (loss, dp, M)."""
    import minc_kernels as mk
    k = ps[0].shape[1]
    ref = mk.MINCLoss(k, moment_momentum=steps_beta, backend="reference").double()
    p64 = [p.detach().cpu().double().requires_grad_() for p in ps]
    t64 = [t.detach().cpu().double() for t in ts]
    loss = ref(tuple(p64), tuple(t64)) if len(ps) > 1 else ref(p64[0], t64[0])
    loss.backward()
    return loss.detach(), [p.grad for p in p64], ref.corrected_moment().float()


@pytest.mark.parametrize("b,k", [(7, 33), (37, 5), (20, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_module_step_matches_float64(kernel_device, b, k, dtype):
    """MINCLoss's kernel step (l2 map, moment, EMA and bias correction, loss and its gradient
    through the map) against the float64 module: fp32 to 1e-5 of the largest value; half
    inputs: the loss within the first-order rounding bound of the storage dtype, the
    gradient within 3x the eager module's error on the same inputs."""
    import minc_kernels as mk
    g = torch.Generator().manual_seed(b * k)
    p = (torch.randn(b, k, generator=g) * 3).to(dtype)
    t = (torch.randn(b, k, generator=g) * 3).to(dtype)
    # a zero row: the map's eps branch (not in fp16 for the eager comparison: eager clamps
    # the fp16 norm at 1e-12, which fp16 rounds to 0, so its zero row is 0/0 = NaN; the
    # kernels divide in fp32, see test_fused_step_maps_an_fp16_zero_row_to_zero)
    if dtype != torch.float16:
        p[1] = 0.0
    fast = mk.MINCLoss(k, moment_momentum=0.9, backend="triton").to(kernel_device)
    pf = p.clone().to(kernel_device).requires_grad_()
    got = fast(pf, t.to(kernel_device))
    got.backward()
    got = got.detach()
    want_loss, (want_dp,), want_m = _module_oracle([p], [t])
    if dtype == torch.float32:
        assert abs(float(got) - float(want_loss)) <= 1e-5 * max(1.0, abs(float(want_loss)))
        assert float((pf.grad.cpu().double() - want_dp).abs().max()) <= 1e-5 * float(want_dp.abs().max())
        torch.testing.assert_close(fast.corrected_moment().cpu(), want_m, rtol=1e-5, atol=1e-6)
        return
    # The loss: both paths round the mapped rows to the storage dtype, and the loss of a
    # single draw then errs by luck as much as by method (one fp16 draw gave eager 3e-7 and
    # the kernels 4e-5 from maps of max error 2.2e-4 and 1.2e-4).  Its bound: the first-order
    # effect of a relative rounding u on every mapped entry, Σ|∂L/∂p̂ ∘ p̂| + Σ|∂L/∂t̂ ∘ t̂|
    # (M = T̂ᵀT̂/B moves with t̂), which both paths must meet.
    from minc_kernels.losses.minc import bilinear_value, l2_rows
    ph = l2_rows(p.double()).requires_grad_()  # leaves: a float64 copy of the map
    th = l2_rows(t.double()).requires_grad_()
    gp, gt = torch.autograd.grad(bilinear_value(ph, th, th.T @ th / b), (ph, th))
    u = torch.finfo(dtype).eps / 2
    bound = 2 * u * float((gp * ph).abs().sum() + (gt * th).abs().sum()) + 1e-6  # + fp32 sums
    eager = mk.MINCLoss(k, moment_momentum=0.9, backend="reference")
    pe = p.clone().requires_grad_()
    e_loss = eager(pe, t)
    e_loss.backward()
    assert abs(float(e_loss) - float(want_loss)) <= bound  # the bound holds for eager too
    assert abs(float(got) - float(want_loss)) <= bound, (float(got) - float(want_loss), bound)
    # the gradient: within 3x eager's error (max over B·k entries: not one draw's luck)
    err = float((pf.grad.cpu().double() - want_dp).abs().max())
    err_eager = float((pe.grad.double() - want_dp).abs().max())
    floor = 0.5 * torch.finfo(dtype).eps * float(want_dp.abs().max())
    assert err <= 3 * err_eager + floor, (err, err_eager)


def test_fused_step_runs_three_launches_and_few_torch_ops(kernel_device, monkeypatch):
    """The default MINCLoss call takes the fused step (ops.minc.moment_step and
    minc_l2_loss); other configurations (clip, raise, return_parts) the general path.  The
    fused fwd+bwd runs 6 Triton launches and at most 10 other kernel ops where the general
    path ran 47 (benchmarks/cpu_host_overhead.py's count); 7 and 4 since the loss comes from
    rowmat's partials in one ``combine_kernel`` launch (four torch ops before) and backward
    scales and rounds the gradient in one op, and 3 torch ops since the EMA kernel counts
    skips in place: the update count's copy, backward's seed and its scaling."""
    import minc_kernels as mk
    from benchmarks.cpu_host_overhead import LaunchStub, count_ops
    calls = []
    real = ops.moment_step
    monkeypatch.setattr(ops, "moment_step", lambda *a: calls.append(1) or real(*a))
    p = torch.randn(12, 16, device=kernel_device).requires_grad_()
    t = torch.randn(12, 16, device=kernel_device)
    for kw, fused in ((dict(), True), (dict(check_finite="ignore"), True),
                      (dict(feature_norm="clip"), False), (dict(check_finite="raise"), False),
                      (dict(scale=2.0), False)):
        calls.clear()
        mk.MINCLoss(16, backend="triton", **kw).to(kernel_device)(p, t)
        assert bool(calls) == fused, kw
    calls.clear()
    mk.MINCLoss(16, backend="triton").to(kernel_device)(p, t, return_parts=True)
    assert not calls
    if kernel_device.type == "cuda":
        return  # the op count below is of the CPU ops (launches stubbed)
    loss = mk.MINCLoss(16, backend="triton")

    def run():
        p.grad = None
        loss(p, t).backward()
    run()
    with LaunchStub() as stub:
        got = count_ops(run)
    assert sum(stub.counts.values()) == 7 and stub.counts["combine_kernel"] == 1, dict(stub.counts)
    want_ops = {"aten::copy_": 1, "aten::ones_like": 1, "aten::mul": 1}
    assert got["aten_kernel_op_names"] == want_ops, got


@pytest.mark.parametrize("targets", [1, 2, 3])
def test_moment_update_sums_the_row_slices_in_the_ema_kernel(kernel_device, targets):
    """The moment step hands the targets' Grams to the EMA kernel as row slices (one
    ``moment_partial_kernel`` launch for two targets), which adds them in order: no torch
    sum of the slices, no add per further target (three targets: one cat).  The moment
    against the float64 EMA of Σ_i h_i h_iᵀ / rows; a NaN row in one target still skips."""
    from benchmarks.cpu_host_overhead import LaunchStub, count_ops
    g = torch.Generator().manual_seed(11)
    hats = [torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
            .to(kernel_device) for _ in range(targets)]
    m0 = torch.eye(16, device=kernel_device) / 16
    beta = 0.9
    if kernel_device.type == "cpu":
        assert gram.gram_slices(hats[:1]).shape[1] > 1  # the interpreter's tiles split the rows
        state = (m0.clone(), torch.tensor(3, device=kernel_device),
                 torch.tensor(0, device=kernel_device))
        with LaunchStub() as stub:
            got = count_ops(lambda: ops.moment_update_body(hats, *state, beta, True, True, True))
        assert stub.counts["moment_partial_kernel"] == (targets + 1) // 2, dict(stub.counts)
        assert stub.counts["moment_ema_kernel"] == 1
        want = {"aten::copy_": 1} | ({"aten::cat": 1} if targets == 3 else {})
        assert got["aten_kernel_op_names"] == want, got
    m, nu, sk = m0.clone(), torch.tensor(3, device=kernel_device), torch.tensor(0, device=kernel_device)
    ops.moment_update_body(hats, m, nu, sk, beta, True, True, True)
    c = sum(h.double().T @ h.double() for h in hats) / (40 * targets)
    torch.testing.assert_close(m.double(), beta * m0.double() + (1 - beta) * c, rtol=1e-6,
                               atol=1e-7)
    assert (int(nu), int(sk)) == (4, 0)
    hats[-1][5] = float("nan")
    ops.moment_update_body(hats, m, nu, sk, beta, True, True, True)
    assert (int(nu), int(sk)) == (4, 1) and bool(torch.isfinite(m).all())


@pytest.mark.parametrize("check", ["skip", "ignore"])
def test_fused_step_skips_a_non_finite_target_on_the_device(kernel_device, check):
    import minc_kernels as mk
    loss = mk.MINCLoss(6, moment_momentum=0.5, check_finite=check, backend="triton").to(kernel_device)
    loss(torch.randn(5, 6, device=kernel_device), torch.randn(5, 6, device=kernel_device))
    m0 = loss.moment.clone()
    t = torch.randn(5, 6, device=kernel_device)
    t[2, 3] = float("inf")  # a row whose map is NaN
    out = loss(torch.randn(5, 6, device=kernel_device), t)
    if check == "skip":
        assert torch.equal(loss.moment, m0) and int(loss.num_updates) == 1
        assert int(loss.nonfinite_skips) == 1
        assert torch.isnan(out)  # the NaN target row still reaches the cross term
    else:
        assert torch.isnan(loss.moment).all() and int(loss.num_updates) == 2
    # eval: no update, the corrected M of the last state
    loss.eval()
    n = int(loss.num_updates)
    loss(torch.randn(5, 6, device=kernel_device), torch.randn(5, 6, device=kernel_device))
    assert int(loss.num_updates) == n


def test_moment_ema_kernel_matches_the_torch_update(kernel_device):
    """ops.minc.moment_ema_ against minc_moment_update_or_skip_ + minc_corrected_moment:
    update, skip, eval (no update), no bias correction, β = 0."""
    from minc_kernels.losses.minc import minc_corrected_moment, minc_moment_update_or_skip_
    g = torch.Generator().manual_seed(3)
    f = torch.randn(40, 9, generator=g)
    m = (f.T @ f / 40).to(kernel_device)
    x = torch.randn(30, 9, generator=g)
    c = (x.T @ x).to(kernel_device)
    for beta in (0.9, 0.0):
        for bad in (False, True):
            cc = c.clone()
            if bad:
                cc[0, 0] = float("nan")
            m1, n1, s1 = m.clone(), torch.tensor(4, device=kernel_device), torch.tensor(2, device=kernel_device)
            m2, n2, s2 = m.clone(), n1.clone(), s1.clone()
            out = ops.moment_ema_(m1, n1, s1, cc, 30, beta, True, True, True)
            minc_moment_update_or_skip_(m2, cc / 30, 1.0 - beta, n2, s2)
            torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-7)
            assert (int(n1), int(s1)) == (int(n2), int(s2)) == ((4, 3) if bad else (5, 2))
            if beta == 0.0:
                assert out is None  # the loss reads M itself
            else:
                torch.testing.assert_close(out, minc_corrected_moment(m2, beta, n2), rtol=1e-6, atol=1e-7)
    # eval: M and the counts untouched, the correction of the current count
    m1, n1, s1 = m.clone(), torch.tensor(4, device=kernel_device), torch.tensor(2, device=kernel_device)
    out = ops.moment_ema_(m1, n1, s1, None, 30, 0.9, False, True, True)
    assert torch.equal(m1, m) and int(n1) == 4 and int(s1) == 2
    torch.testing.assert_close(out, minc_corrected_moment(m, 0.9, n1), rtol=1e-6, atol=1e-7)
    assert ops.moment_ema_(m1, n1, s1, None, 30, 0.9, False, True, False) is None


def test_fused_module_compiles_with_its_state(kernel_device):
    """Under torch.compile(fullgraph=True) the step's mutating op updates M and the counts
    as in eager, two steps in a row, with the gradient."""
    import minc_kernels as mk
    torch._dynamo.reset()
    eager = mk.MINCLoss(8, moment_momentum=0.7, backend="triton").to(kernel_device)
    comp = mk.MINCLoss(8, moment_momentum=0.7, backend="triton").to(kernel_device)
    f = torch.compile(comp, fullgraph=True, backend="aot_eager")
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        p = torch.randn(6, 8, generator=g).to(kernel_device)
        t = torch.randn(6, 8, generator=g).to(kernel_device)
        pa, pb = p.clone().requires_grad_(), p.clone().requires_grad_()
        a, b = eager(pa, t), f(pb, t)
        a.backward()
        b.backward()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(comp.moment, eager.moment, rtol=1e-6, atol=1e-7)
        assert int(comp.num_updates) == int(eager.num_updates) == step + 1


@pytest.mark.parametrize("bias", [False, True])
def test_step_ops_opcheck(kernel_device, bias):
    p, t, m = _inputs(7, 5, torch.float32, kernel_device, seed=12)
    torch.library.opcheck(ops.minc_l2_loss_fwd, (p, t, m, False, True))
    counts = [torch.tensor(3, device=kernel_device), torch.tensor(0, device=kernel_device)]
    torch.library.opcheck(ops.minc_l2_rows, (t,))
    torch.library.opcheck(ops.minc_moment_update_, ([t, t * 2], m.clone(), *counts, 0.9, True,
                                                   True, bias))


def test_fused_step_maps_an_fp16_zero_row_to_zero(kernel_device):
    h, denom = ops.l2_rows(torch.zeros(3, 5, dtype=torch.float16, device=kernel_device))
    assert torch.equal(h, torch.zeros_like(h)) and torch.equal(denom, torch.full_like(denom, ops.L2_EPS))


@pytest.mark.gpu
@pytest.mark.parametrize("b,k", [(4096, 256), (256, 2048), (1031, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_module_step_large(b, k, dtype):
    """MINCLoss's fused step on the GPU at large shapes: :func:`_check_two_steps`."""
    _check_two_steps(b, k, dtype, torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_module_two_steps_small(kernel_device, dtype):
    """The GPU test's checks (:func:`_check_two_steps`) at a shape the interpreter runs."""
    _check_two_steps(24, 20, dtype, kernel_device)


def _check_two_steps(b, k, dtype, dev):
    """Two steps of MINCLoss's fused step against the float64 module.  fp32: 1e-5 of the
    largest value.  Half: the loss within a rounding bound from its first-order terms (every
    mapped entry of p̂ and t̂ rounded once, each entry of M an average of products of rounded
    entries, so off by at most 2u of the same average of |products|), which the eager module
    must meet too; the gradient within 3x eager's error; M within 2 eps of its largest entry."""
    import minc_kernels as mk
    from minc_kernels.losses.minc import bilinear_value, l2_rows
    fast = mk.MINCLoss(k, moment_momentum=0.9, backend="triton").to(dev)
    eager = mk.MINCLoss(k, moment_momentum=0.9, backend="reference").to(dev)
    ref = mk.MINCLoss(k, moment_momentum=0.9, backend="reference").double()
    # fed |t|: the same EMA of |t̂|ᵀ|t̂|/B (the map keeps norms), bounding M's rounding
    ref_abs = mk.MINCLoss(k, moment_momentum=0.9, backend="reference").double()
    u = torch.finfo(dtype).eps / 2
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        p = torch.randn(b, k, generator=g).to(dtype)
        t = torch.randn(b, k, generator=g).to(dtype)
        pf, pe, pd = (p.to(dev, copy=True).requires_grad_(), p.to(dev, copy=True).requires_grad_(),
                      p.double().requires_grad_())
        lf, le, ld = fast(pf, t.to(dev)), eager(pe, t.to(dev)), ref(pd, t.double())
        with torch.no_grad():
            ref_abs(p.double(), t.double().abs())
        for x in (lf, le, ld):
            x.backward()
        scale = float(pd.grad.abs().max())
        err = float((pf.grad.cpu().double() - pd.grad).abs().max())
        if dtype == torch.float32:
            assert abs(float(lf) - float(ld)) <= 1e-5 * max(1.0, abs(float(ld)))
            assert err <= 1e-5 * scale
        else:
            ph = l2_rows(p.double()).requires_grad_()
            th = l2_rows(t.double()).requires_grad_()
            m = ref.corrected_moment().double().requires_grad_()
            gp, gt, gm = torch.autograd.grad(bilinear_value(ph, th, m), (ph, th, m))
            # first-order terms: a relative rounding of at most u on each mapped entry, 2u
            # on each entry of M (of at most its |products| average).  Their worst case
            # (2u·Σ|c|) was 0.02 here, looser than the old 1e-2 test; as independent
            # roundings their sum has σ <= u·‖c‖/√3, and the bound is 8u·‖c‖ (~14σ), 10-70x
            # above the kernels' errors at 24×20-200×48 (the interpreter, bf16).
            c = torch.cat([(gp * ph).flatten(), (gt * th).flatten(),
                           (gm * ref_abs.corrected_moment().double()).flatten()])
            bound = 8 * u * float(c.detach().norm()) + 1e-6 * max(1.0, abs(float(ld)))
            assert abs(float(le) - float(ld)) <= bound, ("eager", float(le) - float(ld), bound)
            assert abs(float(lf) - float(ld)) <= bound, (float(lf) - float(ld), bound)
            err_e = float((pe.grad.cpu().double() - pd.grad).abs().max())
            assert err <= 3 * err_e + 0.5 * torch.finfo(dtype).eps * scale
        # M averages products of mapped entries, each rounded once to the storage dtype
        m_tol = (1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps) * float(ref.moment.abs().max())
        assert float((fast.moment.cpu().double() - ref.moment).abs().max()) <= m_tol
