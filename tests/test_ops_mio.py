"""Triton MIO loss (minc_kernels.ops.mio) vs the eager reference and a float64 oracle.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (set in conftest.py)
on CPU tensors; the GPU-marked tests add large shapes and memory bounds.
"""
import math
import subprocess
import sys

import pytest
import torch

from minc_kernels import MIOLoss, functional as Fn, reference
from minc_kernels import _backend

mio_ops = pytest.importorskip("minc_kernels.ops.mio")

TEMPS = [  # (τp, τn, λ)
    (0.5, 0.5, 1.0),
    (0.05, 0.05, 0.0),
    (0.1, 0.3, 0.5),
]


def _inputs(b, k, device, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, k, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(b, k, generator=g, dtype=torch.float64)  # correlated views
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


def _loss_and_grads(fn, z1, z2, upstream):
    a = z1.detach().clone().requires_grad_()
    b = z2.detach().clone().requires_grad_()
    loss = fn(a, b)
    (loss * upstream).backward()
    return loss.detach().double().cpu(), a.grad.double().cpu(), b.grad.double().cpu()


def _triton(tp, tn, lam):
    return lambda a, b: Fn.mio_loss(a, b, tp, tn, lam, backend="triton")


def _ref(tp, tn, lam):
    return lambda a, b: reference.mio_loss(a, b, tp, tn, lam)


def _rel(x, y):
    """max |x - y| relative to max |y| (y: the oracle)."""
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("b,k", [(2, 3), (3, 17), (7, 20), (37, 48)])
@pytest.mark.parametrize("tp,tn,lam", TEMPS)
def test_fp32_matches_float64_oracle(kernel_device, b, k, tp, tn, lam):
    z1, z2 = _inputs(b, k, "cpu", seed=b * 100 + k)
    up = torch.tensor(0.37 + b / 11.0, dtype=torch.float64)
    lo, g1o, g2o = _loss_and_grads(_ref(tp, tn, lam), z1, z2, up)
    lt, g1t, g2t = _loss_and_grads(_triton(tp, tn, lam), z1.float().to(kernel_device),
                                   z2.float().to(kernel_device), up.float().to(kernel_device))
    assert torch.isfinite(lt)
    assert abs(lt.item() - lo.item()) <= 2e-6 * abs(lo.item()) + 1e-7
    assert _rel(g1t, g1o) < 2e-5
    assert _rel(g2t, g2o) < 2e-5


@pytest.mark.parametrize("overrides", [
    dict(block_m=16, block_n=16, n_splits=1),             # register path, many row/col blocks
    dict(block_m=16, block_n=32, n_splits=3),             # column splits, summed in order
    dict(block_m=16, block_n=16, block_k=16, n_splits=2),  # streamed k, accumulator in memory
    dict(block_m=16, block_n=16, block_k=16, strip_rows=16),  # strips of S + GEMM, 3 groups
    dict(block_m=16, block_n=32, block_k=16, strip_rows=48),  # last group partly outside N
    dict(block_m=16, block_n=16, block_k=16, strip_rows=32),  # uneven: 1 + 2 row blocks
])
def test_launch_paths_match(kernel_device, overrides):
    b, k, (tp, tn, lam) = 21, 40, (0.2, 0.1, 0.8)
    cfg = mio_ops.pick_config(b, k, torch.float32, on_gpu=kernel_device.type == "cuda", **overrides)
    assert cfg["ACC_IN_REGS"] == ("block_k" not in overrides)
    z1, z2 = _inputs(b, k, "cpu", seed=5)
    lo, g1o, g2o = _loss_and_grads(_ref(tp, tn, lam), z1, z2, torch.tensor(1.0, dtype=torch.float64))
    loss, dz = mio_ops.mio_forward(z1.float().to(kernel_device), z2.float().to(kernel_device),
                                   tp, tn, lam, True, cfg)
    assert abs(loss.item() - lo.item()) <= 2e-6 * abs(lo.item())
    assert _rel(dz[:b].double().cpu(), g1o) < 2e-5
    assert _rel(dz[b:].double().cpu(), g2o) < 2e-5


@pytest.mark.parametrize("b", [64, 70])
def test_interior_tiles_skip_masks_exactly(kernel_device, b):
    """Many 16×16 tiles: most meet neither diagonal nor edge and take the unmasked branch."""
    k = 24
    cfg = mio_ops.pick_config(b, k, torch.float32, on_gpu=kernel_device.type == "cuda",
                              block_m=16, block_n=16, n_splits=2)
    z1, z2 = _inputs(b, k, "cpu", seed=b)
    lo, g1o, g2o = _loss_and_grads(_ref(0.05, 0.3, 0.7), z1, z2, torch.tensor(1.0, dtype=torch.float64))
    loss, dz = mio_ops.mio_forward(z1.float().to(kernel_device), z2.float().to(kernel_device),
                                   0.05, 0.3, 0.7, True, cfg)
    assert abs(loss.item() - lo.item()) <= 2e-6 * abs(lo.item())
    assert _rel(dz[:b].double().cpu(), g1o) < 2e-5 and _rel(dz[b:].double().cpu(), g2o) < 2e-5


def test_large_k_strip_path(kernel_device):
    """k > 256 (not a power of two): S over k chunks into a strip, gradient by a GEMM."""
    b, k = 5, 300
    cfg = mio_ops.pick_config(b, k, torch.float32, on_gpu=kernel_device.type == "cuda")
    assert not cfg["ACC_IN_REGS"] and cfg["strip_rows"] > 0
    z1, z2 = _inputs(b, k, "cpu", seed=3)
    up = torch.tensor(-1.3, dtype=torch.float64)
    lo, g1o, g2o = _loss_and_grads(_ref(0.5, 0.5, 1.0), z1, z2, up)
    lt, g1t, g2t = _loss_and_grads(_triton(0.5, 0.5, 1.0), z1.float().to(kernel_device),
                                   z2.float().to(kernel_device), up.float().to(kernel_device))
    assert abs(lt.item() - lo.item()) <= 2e-6 * abs(lo.item())
    assert _rel(g1t, g1o) < 2e-5 and _rel(g2t, g2o) < 2e-5
    with torch.no_grad():
        ln = Fn.mio_loss(z1.float().to(kernel_device), z2.float().to(kernel_device), 0.5, 0.5, 1.0,
                         backend="triton")
    assert torch.equal(ln.cpu().double(), lt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,k,tp,tn", [(7, 24, 0.5, 0.5), (37, 48, 0.05, 0.1)])
def test_half_precision_error_within_3x_eager(kernel_device, dtype, b, k, tp, tn):
    lam = 0.5
    z1, z2 = _inputs(b, k, "cpu", seed=b + k)
    up = torch.tensor(0.8, dtype=torch.float64)
    # the oracle sees the same rounded inputs as both dtype paths
    z1o, z2o = z1.to(dtype).double(), z2.to(dtype).double()
    lo, g1o, g2o = _loss_and_grads(_ref(tp, tn, lam), z1o, z2o, up)
    le, g1e, g2e = _loss_and_grads(_ref(tp, tn, lam), z1.to(dtype), z2.to(dtype), up.float())
    lt, g1t, g2t = _loss_and_grads(_triton(tp, tn, lam), z1.to(dtype).to(kernel_device),
                                   z2.to(dtype).to(kernel_device), up.float().to(kernel_device))
    floor = 1e-5  # fp32-level, far below the half-precision errors (~1e-4 .. 1e-2)
    assert abs(lt.item() - lo.item()) <= 3 * abs(le.item() - lo.item()) + floor * abs(lo.item())
    assert _rel(g1t, g1o) <= 3 * _rel(g1e, g1o) + floor
    assert _rel(g2t, g2o) <= 3 * _rel(g2e, g2o) + floor


def test_non_contiguous_inputs(kernel_device):
    b, k = 9, 13
    z1, z2 = _inputs(b, 2 * k, "cpu", seed=11)
    z1n = z1[:, ::2]                      # column stride 2
    z2n = z2[:, :k].t().contiguous().t()  # column-major
    assert not z1n.is_contiguous() and not z2n.is_contiguous()
    up = torch.tensor(1.7, dtype=torch.float64)
    lo, g1o, g2o = _loss_and_grads(_ref(0.3, 0.6, 1.0), z1n, z2n, up)
    a = z1.float().to(kernel_device)[:, ::2]
    b_ = z2[:, :k].float().t().contiguous().to(kernel_device).t()
    assert not a.is_contiguous() and not b_.is_contiguous()
    lt, g1t, g2t = _loss_and_grads(_triton(0.3, 0.6, 1.0), a, b_, up.float().to(kernel_device))
    assert abs(lt.item() - lo.item()) <= 2e-6 * abs(lo.item())
    assert _rel(g1t, g1o) < 2e-5 and _rel(g2t, g2o) < 2e-5


def test_collapsed_batch_sanity_value(kernel_device):
    """All rows equal: every S entry is 1, L = softplus(-2) + softplus(2) (τ=0.5, λ=0)."""
    row = torch.randn(1, 10)
    z = row.expand(6, 10).contiguous().to(kernel_device)
    loss = Fn.mio_loss(z, 3.0 * z, 0.5, 0.5, 0.0, backend="triton")
    expected = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0))
    assert abs(expected - 2.253856) < 1e-6
    assert abs(loss.item() - expected) < 1e-6


def test_tiny_and_zero_rows_match_normalize_gradient(kernel_device):
    """Norm below eps: F.normalize clamps it at eps, its gradient is g/eps (no projection)."""
    z1, z2 = _inputs(4, 6, "cpu", seed=2)
    z1[1] = 0.0
    z2[2] = z2[2] * (3e-13 / z2[2].norm())  # 0 < ||z|| < eps: ẑ has norm 0.3, not 1
    up = torch.tensor(1.0, dtype=torch.float64)
    lo, g1o, g2o = _loss_and_grads(_ref(0.5, 0.5, 1.0), z1, z2, up)
    lt, g1t, g2t = _loss_and_grads(_triton(0.5, 0.5, 1.0), z1.float().to(kernel_device),
                                   z2.float().to(kernel_device), up.float().to(kernel_device))
    assert abs(lt.item() - lo.item()) <= 2e-6 * abs(lo.item())
    assert g1o[1].abs().max() > 1e6 and g2o[2].abs().max() > 1e6  # the eps branch is exercised
    assert _rel(g1t, g1o) < 2e-5 and _rel(g2t, g2o) < 2e-5


def test_extreme_temperature_is_finite_and_exact(kernel_device):
    """τ=0.02 with near-identical and opposite rows: |S/τ| = 50, softplus terms ~ 1e-22."""
    b, k = 6, 16
    z1, _ = _inputs(b, k, "cpu", seed=4)
    z1[3] = -z1[0]
    z2 = z1 + 1e-3 * torch.randn(b, k, dtype=torch.float64)
    up = torch.tensor(1.0, dtype=torch.float64)
    lo, g1o, g2o = _loss_and_grads(_ref(0.02, 0.02, 0.0), z1, z2, up)
    lt, g1t, g2t = _loss_and_grads(_triton(0.02, 0.02, 0.0), z1.float().to(kernel_device),
                                   z2.float().to(kernel_device), up.float().to(kernel_device))
    assert torch.isfinite(lt) and torch.isfinite(g1t).all() and torch.isfinite(g2t).all()
    assert abs(lt.item() - lo.item()) <= 1e-5 * abs(lo.item())
    assert _rel(g1t, g1o) < 1e-4 and _rel(g2t, g2o) < 1e-4


def test_deterministic(kernel_device):
    z1, z2 = _inputs(19, 33, kernel_device, seed=8, dtype=torch.float32)
    runs = [_loss_and_grads(_triton(0.2, 0.4, 1.0), z1, z2, torch.tensor(1.0, device=kernel_device))
            for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_gradient_only_where_needed_and_no_grad_path(kernel_device):
    z1, z2 = _inputs(5, 7, kernel_device, seed=9, dtype=torch.float32)
    with torch.no_grad():
        l0 = Fn.mio_loss(z1, z2, 0.5, 0.5, 1.0, backend="triton")
    loss, dz = torch.ops.minc_kernels.mio_loss_fwd(z1, z2, 0.5, 0.5, 1.0, False)
    assert dz.numel() == 0 and torch.equal(loss, l0)
    a = z1.clone().requires_grad_()
    loss = Fn.mio_loss(a, z2, 0.5, 0.5, 1.0, backend="triton")
    loss.backward()
    ref = z1.clone().requires_grad_()
    reference.mio_loss(ref, z2, 0.5, 0.5, 1.0).backward()
    assert torch.equal(loss.detach(), l0)
    torch.testing.assert_close(a.grad, ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck(kernel_device, need_grad):
    z1, z2 = _inputs(6, 10, kernel_device, seed=1, dtype=torch.float32)
    if need_grad:
        z1.requires_grad_()
        z2.requires_grad_()
    torch.library.opcheck(torch.ops.minc_kernels.mio_loss_fwd.default,
                          (z1, z2, 0.5, 0.3, 1.0, need_grad))


def test_torch_compile_fullgraph(kernel_device):
    z1, z2 = _inputs(6, 12, kernel_device, seed=6, dtype=torch.float32)
    module = MIOLoss(0.4, 0.2, 0.5, backend="triton")
    compiled = torch.compile(module, fullgraph=True)
    up = torch.tensor(1.0, device=kernel_device)
    lc, g1c, g2c = _loss_and_grads(compiled, z1, z2, up)
    le, g1e, g2e = _loss_and_grads(module, z1, z2, up)
    assert torch.equal(lc, le)
    torch.testing.assert_close(g1c, g1e, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g2c, g2e, rtol=1e-6, atol=1e-9)


def test_pick_config_never_leaves_an_empty_split():
    for b in (2, 3, 100, 1000, 4096, 32768):
        for k in (3, 128, 257, 8192):
            for dt in (torch.float32, torch.bfloat16):
                cfg = mio_ops.pick_config(b, k, dt, on_gpu=True)
                n_col = -(-2 * b // cfg["BLOCK_N"])
                bps = -(-n_col // cfg["n_splits"])
                assert 1 <= cfg["n_splits"] <= 16 and (cfg["n_splits"] - 1) * bps < n_col
                assert cfg["ACC_IN_REGS"] == (k <= 256)
                if cfg["ACC_IN_REGS"]:
                    assert cfg["BLOCK_K"] >= k
                else:  # strip path: whole row blocks per group, strip <= max(2048, 2k) rows
                    assert cfg["strip_rows"] % cfg["BLOCK_M"] == 0 and cfg["n_splits"] == 1
                    assert cfg["strip_rows"] <= max(2048, 2 * k + cfg["BLOCK_K"])


class _LaunchRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` records ``(grid, args)``."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args))


@pytest.mark.parametrize("b,k,dtype", [(1031, 1001, torch.float32), (1031, 1024, torch.float32),
                                       (1031, 1024, torch.bfloat16), (4096, 300, torch.float32),
                                       (38915, 300, torch.float32), (3000, 8192, torch.bfloat16)])
def test_strips_are_even_and_cover_the_rows(monkeypatch, b, k, dtype):
    """The strip path's row groups: whole row blocks, every row once, at most ``strip_rows``
    each and within one row block of each other (B = 1031 in fp32 was 2048 + 14 rows: last
    launches of 33 and 16 programs on 132 SMs)."""
    strip, matmul = _LaunchRecorder(), _LaunchRecorder()
    monkeypatch.setattr(mio_ops, "mio_negative_strip", strip)
    monkeypatch.setattr(mio_ops, "mio_strip_matmul", matmul)
    cfg = mio_ops.pick_config(b, k, dtype, on_gpu=True)
    n, bm = 2 * b, cfg["BLOCK_M"]
    ks = -(-k // cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    zhat = torch.empty((n, ks), dtype=dtype, device="meta")
    mio_ops._negatives_by_strips(zhat, b, n, ks, 0.5, True, cfg, dtype == torch.float32, False)
    groups = [(args[6], args[7]) for _, args in matmul.calls]  # (row0, rows)
    assert [args[7] for _, args in strip.calls] == [r0 for r0, _ in groups]
    assert groups[0][0] == 0 and sum(r for _, r in groups) == n
    assert all(r0 + r == nxt for (r0, r), (nxt, _) in zip(groups, groups[1:]))
    assert all(r0 % bm == 0 and r <= cfg["strip_rows"] for r0, r in groups)
    blocks = [-(-r // bm) for _, r in groups]
    assert max(blocks) - min(blocks) <= 1, blocks
    n_col = -(-n // cfg["BLOCK_N"])
    assert all(grid[1] == n_col for grid, _ in strip.calls)
    if b == 1031 and dtype == torch.float32:  # each launch fills an H100's 132 SMs
        assert all(g[0] * g[1] >= 132 for g, _ in strip.calls + matmul.calls), \
            [g for g, _ in strip.calls + matmul.calls]


def test_pick_config_small_batch_fills_the_device():
    """Issue 14: at B = 256 the strip path had 4 × 4 (bf16) or 8 × 8 (fp32) programs; the
    tiles now shrink until about two waves of 132 SMs run (the strip GEMM uses them too)."""
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for b, k in ((256, 8192), (256, 1024), (512, 4096)):
            cfg = mio_ops.pick_config(b, k, dt, on_gpu=True)
            n = 2 * b
            row_blocks = -(-cfg["strip_rows"] // cfg["BLOCK_M"])
            assert row_blocks * -(-n // cfg["BLOCK_N"]) >= 256, (dt, b, k, cfg)
            assert row_blocks * -(-k // cfg["BLOCK_N"]) >= 132, (dt, b, k, cfg)


# --------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_b4096_matches_reference(dtype):
    b, k = 4096, 128
    z1, z2 = _inputs(b, k, "cuda", seed=12, dtype=torch.float32)
    up = torch.tensor(0.9, device="cuda")
    lo, g1o, g2o = _loss_and_grads(_ref(0.1, 0.2, 1.0), z1.double(), z2.double(), up.double())
    le, g1e, g2e = _loss_and_grads(_ref(0.1, 0.2, 1.0), z1.to(dtype), z2.to(dtype), up)
    lt, g1t, g2t = _loss_and_grads(_triton(0.1, 0.2, 1.0), z1.to(dtype), z2.to(dtype), up)
    if dtype == torch.float32:
        assert abs(lt.item() - lo.item()) <= 1e-5 * abs(lo.item())
        assert _rel(g1t, g1o) < 1e-4 and _rel(g2t, g2o) < 1e-4
    else:
        floor = 1e-5
        assert abs(lt.item() - lo.item()) <= 3 * abs(le.item() - lo.item()) + floor * abs(lo.item())
        assert _rel(g1t, g1o) <= 3 * _rel(g1e, g1o) + floor
        assert _rel(g2t, g2o) <= 3 * _rel(g2e, g2o) + floor


@pytest.mark.gpu
def test_gpu_large_batch_peak_memory():
    b, k = 32768, 128
    z1, z2 = _inputs(b, k, "cuda", seed=13, dtype=torch.bfloat16)
    z1.requires_grad_()
    z2.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = Fn.mio_loss(z1, z2, 0.1, 0.1, 1.0, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()
    assert extra < 2**30, f"peak extra memory {extra / 2**20:.0f} MiB"


def test_import_fails_with_importerror_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "try:\n    import minc_kernels.ops.mio\nexcept ImportError:\n    sys.exit(0)\nsys.exit(1)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("b,k,dtype", [(300, 64, torch.bfloat16), (300, 64, torch.float32),
                                       (90, 300, torch.bfloat16)])
def test_gpu_launch_configs_in_interpreter(kernel_device, b, k, dtype):
    """The exact tile sizes and column splits a GPU gets, run here (interpreter) vs the oracle."""
    cfg = mio_ops.pick_config(b, k, dtype, on_gpu=True)
    assert cfg["n_splits"] > 1 if k <= 256 else cfg["strip_rows"] > 0
    z1, z2 = _inputs(b, k, "cpu", seed=21)
    z1o, z2o = z1.to(dtype).double(), z2.to(dtype).double()
    lo, g1o, g2o = _loss_and_grads(_ref(0.1, 0.2, 1.0), z1o, z2o, torch.tensor(1.0, dtype=torch.float64))
    loss, dz = mio_ops.mio_forward(z1.to(dtype).to(kernel_device), z2.to(dtype).to(kernel_device),
                                   0.1, 0.2, 1.0, True, cfg)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - lo.item()) <= tol * abs(lo.item())
    assert _rel(dz[:b].double().cpu(), g1o) < tol and _rel(dz[b:].double().cpu(), g2o) < tol


def test_double_backward_raises_instead_of_silent_zero(kernel_device):
    z1, z2 = _inputs(4, 6, kernel_device, seed=3, dtype=torch.float32)
    z1.requires_grad_()
    loss = Fn.mio_loss(z1, z2, 0.5, 0.5, 1.0, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, z1, create_graph=True)
