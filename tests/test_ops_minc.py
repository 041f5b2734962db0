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


@pytest.mark.parametrize("tiles", [(16, 32, 16), (32, 16, 32)])
def test_gha_with_rectangular_tiles(kernel_device, monkeypatch, tiles):
    """The GPU tiles have BLOCK_K != BLOCK_N: the inside/straddling/outside tile tests of the
    lower triangle must hold for any shape, not only for the interpreter's square tiles."""
    bm, bn, bk = tiles
    monkeypatch.setattr(ops, "_rowmat_config",
                        lambda k, for_device=False: dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4))
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
    got = float(ops.gram_dot(t, m))
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


_SM90_COMPILE = r'''
import re, shutil, subprocess, sys, tempfile, os
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from minc_kernels.kernels import minc as km, spectral as ks
from minc_kernels.ops import minc as om, spectral as osp
target = GPUTarget("cuda", 90, 32)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TY = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
def build(kernel, dtype, storage_ptrs, consts, cfg):
    cfg = dict(cfg)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages", 3)}
    consts = {**consts, **cfg}
    sig = {}
    for n in kernel.arg_names:
        if n in consts: sig[n] = "constexpr"
        elif n in storage_ptrs: sig[n] = TY[dtype]
        elif n.endswith("_ptr"): sig[n] = "*fp32"
        elif n in ("r", "alpha", "beta", "gamma"): sig[n] = "fp32"
        else: sig[n] = "i32"
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target, options=opts)
    stack = -1
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        stack = int(re.search(r"STACK:(\d+)", out).group(1))
    print(kernel.fn.__name__, dtype, consts.get("GHA"), consts.get("NEED_GRAD"), "STACK", stack, flush=True)
    return stack
bad = 0
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    f32 = dtype == torch.float32
    for dot in (False, True):
        bad += build(km.moment_partial_kernel, dtype, {"x_ptr"}, dict(IS_FP32=f32, UPCAST=False, DOT_WITH_OTHER=dot),
                     om._gram_config(1024, dtype)) > 0
    for gha in (False, True):
        bad += build(km.rowmat_kernel, dtype, {"x_ptr", "y_ptr"}, dict(NEED_GRAD=True, GHA=gha, HAS_D=True,
                     MODE=om.rhs_f32_mode(dtype), UPCAST=False), om._rowmat_config(1024)) > 0
    for ng in (False, True):
        bad += build(ks.pairwise_offdiag_kernel, dtype, {"x_ptr", "y_ptr"}, dict(NEED_GRAD=ng, IS_FP32=f32,
                     UPCAST=False), osp._pairwise_config(1024, dtype)) > 0
    bad += build(ks.clip_rows_dot_kernel, dtype, {"z1_ptr", "z2_ptr", "z1c_ptr", "z2c_ptr"}, dict(CLIP=True), osp._rows_config(1024)) > 0
    bad += build(ks.clip_rows_backward_kernel, dtype, {"z_ptr"}, {}, osp._rows_config(1024)) > 0
print("SPILLING", bad)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """Compile every kernel for Hopper (sm_90) with ptxas, no GPU needed: catches what the
    interpreter cannot (type/lowering errors) and register spills of the chosen tiles."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SM90_COMPILE], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "SPILLING 0" in out.stdout, out.stdout
