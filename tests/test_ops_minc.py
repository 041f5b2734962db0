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
