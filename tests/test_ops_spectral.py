"""Triton spectral-contrastive kernels (minc_kernels.ops.spectral) against reference.py.

Runs under TRITON_INTERPRET=1 on the CPU (conftest), on CUDA when present.  Shapes are
tiny on purpose: the interpreter is slow.  Every comparison is against a float64 oracle
(the reference evaluated on float64 copies), with a random upstream gradient.
"""
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from minc_kernels import _backend, reference  # noqa: E402
from minc_kernels import functional as Fn  # noqa: E402
from minc_kernels.ops import configs  # noqa: E402
from minc_kernels.ops import spectral as ops  # noqa: E402

MU = 0.7


def _inputs(b, k, dtype, device, seed=0, noncontig=False):
    """Rows alternate between norms well above and well below sqrt(MU), so that clipping
    changes some rows and leaves others (checked by the caller where it matters)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        z = torch.randn(b, k, generator=gen, dtype=torch.float64)
        z = z / z.norm(dim=1, keepdim=True)
        norms = torch.where(torch.arange(b) % 2 == 0, 2.0, 0.4) * math.sqrt(MU)
        norms = norms * (1 + 0.2 * torch.rand(b, generator=gen, dtype=torch.float64))
        z = (z * norms[:, None]).to(dtype)
        if noncontig == "alike":  # both column slices of wider buffers: equal strides
            z = torch.cat([z, z], dim=1)[:, ::2]
        elif noncontig:
            # a transposed view of a (k, B) buffer and a column slice of a wider one
            z = z.T.contiguous().T if not out else torch.cat([z, z], dim=1)[:, ::2]
        assert not noncontig or not z.is_contiguous()
        out.append(z.to(device).requires_grad_())
    return out


def _oracle(z1, z2, mu, clip, g):
    a = z1.detach().cpu().double().requires_grad_()
    b = z2.detach().cpu().double().requires_grad_()
    loss = reference.spectral_loss(a, b, mu=mu, clip=clip, algorithm="pairwise")
    ga, gb = torch.autograd.grad(loss * g, (a, b))
    return loss.detach(), ga, gb


def _run(fn, z1, z2, g):
    loss = fn(z1, z2)
    g1, g2 = torch.autograd.grad(loss * g, (z1, z2))
    return loss.detach().cpu().double(), g1.cpu().double(), g2.cpu().double()


def _kernel(mu, clip, algorithm):
    return lambda z1, z2: ops.spectral_loss(z1, z2, mu, clip, algorithm)


def _errors(got, want):
    return [float((a - b).abs().max()) for a, b in zip(got, want)]


@pytest.mark.parametrize("b,k", [(2, 5), (7, 33), (37, 5)])
@pytest.mark.parametrize("algorithm", ["pairwise", "matrix", "gram", "auto"])
@pytest.mark.parametrize("clip", [True, False])
def test_fp32_matches_float64_oracle(kernel_device, b, k, algorithm, clip):
    z1, z2 = _inputs(b, k, torch.float32, kernel_device)
    g = 1.7
    want = _oracle(z1, z2, MU, clip, g)
    got = _run(_kernel(MU, clip, algorithm), z1, z2, g)
    for name, a, w in zip(("loss", "dz1", "dz2"), got, want):
        scale = float(w.abs().max())
        assert float((a - w).abs().max()) <= 2e-6 * scale + 1e-7, name


def test_clip_changes_some_rows_and_not_others():
    z1, z2 = _inputs(37, 5, torch.float32, "cpu")
    norms = z1.detach().norm(dim=1)
    assert (norms > math.sqrt(MU) * 1.5).any() and (norms < math.sqrt(MU) * 0.6).any()
    # clipping matters: the loss with and without it differ clearly
    with torch.no_grad():
        diff = reference.spectral_loss(z1, z2, MU, True) - reference.spectral_loss(z1, z2, MU, False)
    assert abs(float(diff)) > 1e-2


def test_output_is_fp32_scalar(kernel_device):
    z1, z2 = _inputs(7, 5, torch.bfloat16, kernel_device)
    loss = ops.spectral_loss(z1, z2, MU, True, "pairwise")
    assert loss.dtype == torch.float32 and loss.shape == () and loss.device == z1.device
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert g1.dtype == torch.bfloat16 and g1.shape == z1.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["pairwise", "matrix", "gram"])
@pytest.mark.parametrize("b,k", [(7, 33), (37, 5)])
def test_half_error_within_3x_of_eager(kernel_device, dtype, algorithm, b, k):
    z1, z2 = _inputs(b, k, dtype, kernel_device, seed=1)
    g = -0.6
    want = _oracle(z1, z2, MU, True, g)
    got = _run(_kernel(MU, True, algorithm), z1, z2, g)
    eager = _run(lambda a, c: reference.spectral_loss(a, c, MU, True, algorithm), z1, z2, g)
    eps = torch.finfo(dtype).eps
    for name, a, e, w in zip(("loss", "dz1", "dz2"), got, eager, want):
        err, err_eager = float((a - w).abs().max()), float((e - w).abs().max())
        floor = 0.5 * eps * float(w.abs().max())  # half an ulp of the largest value
        assert err <= 3 * err_eager + floor, (name, err, err_eager, floor)


@pytest.mark.parametrize("algorithm", ["pairwise", "matrix", "gram"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("layout", ["mixed", "alike"])
def test_noncontiguous_inputs(kernel_device, algorithm, clip, layout):
    """The two-view launches (pairwise with its gradient, the clipping Jacobian) take one
    set of strides: views that differ in layout ("mixed") are copied, strided views that
    share theirs ("alike") are read in place."""
    z1, z2 = _inputs(7, 33, torch.float32, kernel_device, seed=2, noncontig=layout)
    assert (z1.stride() == z2.stride()) == (layout == "alike")
    want = _oracle(z1, z2, MU, clip, 0.9)
    got = _run(_kernel(MU, clip, algorithm), z1, z2, 0.9)
    for a, w in zip(got, want):
        assert float((a - w).abs().max()) <= 2e-6 * float(w.abs().max()) + 1e-7


@pytest.mark.parametrize("clip", [True, False])
def test_pairwise_fwd_bwd_launches(clip):
    """Issue 21 item 3: both views' gradients come from one pairwise launch and one
    clipping-Jacobian launch (they were two each), which also sums the gradients' split
    partials (two torch ops before), and the loss from one ``combine_kernel`` launch (five
    torch ops before): 4 Triton launches per fwd+bwd, 3 without clipping where the column
    stream is not split, and no torch op that would launch a kernel in the forward
    (launches stubbed, CPU)."""
    from benchmarks.cpu_host_overhead import LaunchStub, count_ops
    z1, z2 = _inputs(37, 5, torch.float32, "cpu")
    with LaunchStub() as stub:
        ops.spectral_loss(z1, z2, MU, clip, "pairwise").backward()
        counts = dict(stub.counts)
        fwd_ops = count_ops(lambda: ops.spectral_loss(z1, z2, MU, clip, "pairwise"))
    n_split, _ = configs.pairwise_split(37, 5, True, configs.pairwise_config(37, 5, z1.dtype))
    want = {"clip_rows_dot_kernel": 1, "pairwise_offdiag_kernel": 1, "combine_kernel": 1}
    if clip or n_split > 1:
        want["clip_rows_backward_kernel"] = 1
    assert counts == want
    assert fwd_ops["aten_kernel_op_names"] == {}, fwd_ops


@pytest.mark.parametrize("b,k", [(37, 5), (130, 7), (64, 200)])
@pytest.mark.parametrize("clip", [True, False])
def test_split_partials_are_summed_in_order_by_the_clipping_pass(b, k, clip, kernel_device):
    """The pairwise path's gradient partials (splits of its column stream) are summed by
    ``clip_rows_backward_kernel`` in the fixed order 0, 1, ... (the bits of that sum in
    fp32), then the clipping Jacobian applied: against the Jacobian applied by torch to
    that sum (float64 arithmetic on the same summed fp32 gradient)."""
    cfg = configs.pairwise_config(b, k, torch.float32)
    n_split, _ = configs.pairwise_split(b, k, True, cfg)
    assert n_split > 1  # the interpreter's tiles split these
    z1, z2 = _inputs(b, k, torch.float32, kernel_device, seed=31)
    z1, z2 = z1.detach() * 3.0, z2.detach() * 3.0  # rows over sqrt(mu): clipped
    z1c, z2c, d, n1, n2 = ops._clip_rows_dot(z1, z2, MU, clip)
    _, p1, p2 = ops._pairwise(z1c, z2c, 0.3, -0.7, True)
    assert p1.shape == (n_split, b, k)
    want = []
    for p, z, n in ((p1, z1, n1), (p2, z2, n2)):
        g = p[0].clone()
        for s in range(1, n_split):
            g = g + p[s]  # fp32, in order
        if clip:
            r = math.sqrt(MU)
            zz, gg = z.double(), g.double()
            norm = n.double()[:, None]
            jac = (r / norm) * (gg - zz * (zz * gg).sum(1, keepdim=True) / norm ** 2)
            g = torch.where(norm >= r, jac, gg)
        want.append(g)
    g1, g2 = ops._finish_grads_(z1, n1, p1, z2, n2, p2, MU, clip)
    assert g1.data_ptr() == p1.data_ptr() and g2.data_ptr() == p2.data_ptr()  # in place
    for got, w in zip((g1, g2), want):
        if clip:
            torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matrix_path_launches_and_modes(dtype, request):
    """The matrix path writes S once (one cross_gram launch), and S' with its transpose in
    one pass, and takes both gradients in one rowmat launch (its partials unsummed: no torch
    op in the forward), with no pairwise launch; half inputs multiply S rounded to their
    dtype (MODE 4: one dot per tile), fp32 strict fp32 (MODE 0); the gradients come out
    contiguous (B, k)."""
    from benchmarks.cpu_host_overhead import LaunchStub, count_ops
    z1, z2 = _inputs(37, 53, dtype, "cpu", seed=14)
    with LaunchStub() as stub:
        ops.spectral_loss(z1, z2, MU, True, "matrix").backward()
    assert dict(stub.counts) == {"clip_rows_dot_kernel": 1, "cross_gram_kernel": 1,
                                 "gram_finish_kernel": 1, "rowmat_kernel": 1,
                                 "clip_rows_backward_kernel": 1, "combine_kernel": 1}
    with LaunchStub():
        fwd = count_ops(lambda: ops.spectral_loss_fwd(z1.detach(), z2.detach(), MU, True,
                                                      "matrix", True))
    assert fwd["aten_kernel_op_names"] == {}, fwd
    rowmat_calls = request.getfixturevalue("rowmat_calls")  # after the stub: launches run
    loss, g1, g2 = ops.spectral_loss_fwd(z1.detach(), z2.detach(), MU, True, "matrix", True)
    want_mode = 0 if dtype == torch.float32 else 4
    assert [c[:2] for c in rowmat_calls] == [(want_mode, dtype)]
    assert g1.is_contiguous() and g2.is_contiguous() and g1.shape == z1.shape
    # without a gradient "matrix" is the pairwise pass (S is never needed whole)
    with LaunchStub() as stub:
        with torch.no_grad():
            ops.spectral_loss(z1, z2, MU, True, "matrix")
    assert dict(stub.counts) == {"clip_rows_dot_kernel": 1, "pairwise_offdiag_kernel": 1,
                                 "combine_kernel": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gram_path_rounds_the_grams_for_bf16_only(dtype, rowmat_calls):
    """The gram path's gradient products: bf16 rows take the Grams rounded to bf16 (MODE 4,
    one native dot, exactly torch's rounding of the fp32 Grams), fp16 and fp32 rows the
    fp32 Grams (MODE 2 / 0); both views in one rowmat launch either way."""
    z1, z2 = _inputs(37, 21, dtype, "cpu", seed=17)
    ops.spectral_loss_fwd(z1.detach(), z2.detach(), MU, False, "gram", True)
    (mode, g_dtype, g2, g1), = rowmat_calls
    assert (mode, g_dtype) == {torch.float32: (0, torch.float32), torch.float16: (2, torch.float32),
                               torch.bfloat16: (4, torch.bfloat16)}[dtype]
    if dtype == torch.bfloat16:  # (no clipping: the Grams of the inputs themselves)
        from minc_kernels.ops.gram import gram
        for g, z in ((g1, z1), (g2, z2)):
            assert torch.equal(g, gram(z.detach()).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_grad", [True, False])
def test_gram_path_sums_its_partials_in_the_combine(dtype, need_grad):
    """The gram path's loss partials (rowmat's Σ xᵀ G2 x with the gradient, gram_dot's
    without) go to the loss's combine_kernel unsummed: a torch op fewer each; bf16 with the
    gradient takes <G1, G2>_F per tile and both Grams rounded from one gram_finish pass
    (a fp32 dot and a rounding copy before).  No torch op is left in the forward."""
    from benchmarks.cpu_host_overhead import LaunchStub, count_ops
    z1, z2 = _inputs(40, 37, dtype, "cpu", seed=19)
    with LaunchStub() as stub:
        got = count_ops(lambda: ops.spectral_loss_fwd(z1.detach(), z2.detach(), MU, True,
                                                      "gram", need_grad))
    assert got["aten_kernel_op_names"] == {}, got
    assert stub.counts["combine_kernel"] == 1
    rounds = need_grad and dtype == torch.bfloat16
    assert stub.counts["gram_finish_kernel"] == rounds, dict(stub.counts)


@pytest.mark.parametrize("b,k", [(96, 24), (130, 7)])
def test_bf16_gram_path_meets_the_eager_pairwise_bound(kernel_device, b, k):
    """The bf16 gram path (B > k, where ``auto`` takes it) against the stricter eager
    form, the pairwise one: loss and gradients within 3x its error against float64, on
    aligned views (z2 ≈ z1, as in training), where <G1, G2>_F - Σ d² cancels to a few
    percent: the loss must keep the fp32 Grams (from the rounded ones its error would be
    ~2^-9 <G1, G2>_F, far above eager's)."""
    gen = torch.Generator().manual_seed(18)
    base = torch.randn(b, k, generator=gen, dtype=torch.float64)
    z1 = base + 0.05 * torch.randn(b, k, generator=gen, dtype=torch.float64)
    z2 = base + 0.05 * torch.randn(b, k, generator=gen, dtype=torch.float64)
    z1, z2 = [(z / z.norm(dim=1, keepdim=True) * 0.8).bfloat16().to(kernel_device)
              .requires_grad_() for z in (z1, z2)]
    want = _oracle(z1, z2, MU, True, -1.3)
    got = _run(_kernel(MU, True, "gram"), z1, z2, -1.3)
    eager = _run(lambda a, c: reference.spectral_loss(a, c, MU, True, "pairwise"), z1, z2, -1.3)
    eps = torch.finfo(torch.bfloat16).eps
    for name, a, e, w in zip(("loss", "dz1", "dz2"), got, eager, want):
        err, err_eager = float((a - w).abs().max()), float((e - w).abs().max())
        floor = 0.5 * eps * float(w.abs().max()) if name != "loss" else 0.0
        assert err <= 3 * err_eager + floor, (name, err, err_eager, floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_offdiag_finish_sums_slices_in_order_and_rounds_like_torch(dtype):
    """The matrix path's pass (gram_finish, diagonal zeroed): S = ((part[0] + part[1]) +
    part[2]), its diagonal zeroed, rounded to the storage dtype exactly as torch rounds
    (round to nearest even, also for bf16 under the interpreter) and written with its
    transpose, and the per-program Σ S'² summing to the fp32 value."""
    from minc_kernels.ops import configs
    from minc_kernels.ops.gram import gram_finish
    n = 45  # 3×3 tiles of 16 (the interpreter's block below), the last ones partial
    part = torch.randn(3, n, n, generator=torch.Generator().manual_seed(15)) * 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "FINISH_BLOCK", 16)
        sq, (s, s_t) = gram_finish(part.unsqueeze(0), out_dtype=dtype, transpose=True)
    want = (part[0] + part[1]) + part[2]
    want.diagonal().zero_()
    assert torch.equal(s, want.to(dtype)) and torch.equal(s_t, want.T.to(dtype))
    assert sq.shape == (9, 2)
    torch.testing.assert_close(sq[:, 0].sum(), want.pow(2).sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrix_path_with_row_slices(kernel_device, dtype):
    """B = 5, k = 40: S's few tiles split the k rows of the transposed views into slices
    (cross_gram's row split), which gram_finish_kernel adds: still the oracle's values."""
    from minc_kernels.ops import gram as G
    seen = []
    real = G.cross_gram_partials

    def spy(*a):
        out, split = real(*a)
        seen.append(split)
        return out, split

    z1, z2 = _inputs(5, 40, dtype, kernel_device, seed=16)
    want = _oracle(z1, z2, MU, True, 1.1)
    import unittest.mock
    with unittest.mock.patch.object(ops, "cross_gram_partials", spy):
        got = _run(_kernel(MU, True, "matrix"), z1, z2, 1.1)
    assert seen and seen[0] > 1
    if dtype == torch.float32:
        for a, w in zip(got, want):
            assert float((a - w).abs().max()) <= 2e-6 * float(w.abs().max()) + 1e-7
    else:
        eager = _run(lambda a, c: reference.spectral_loss(a, c, MU, True, "pairwise"), z1, z2, 1.1)
        eps = torch.finfo(dtype).eps
        for a, e, w in zip(got, eager, want):
            err, err_eager = float((a - w).abs().max()), float((e - w).abs().max())
            assert err <= 3 * err_eager + 0.5 * eps * float(w.abs().max())


@pytest.mark.parametrize("tiles", [(16, 32, 16, 32), (32, 16, 32, 16)])
def test_pairwise_with_rectangular_tiles(kernel_device, monkeypatch, tiles):
    """GPU tiles are not the interpreter's 16-squares: diagonal masking and column chunks
    must hold for BLOCK_M != BLOCK_N and BLOCK_K != BLOCK_C."""
    bm, bn, bk, bc = tiles
    monkeypatch.setattr(configs, "pairwise_config", lambda b, k, dtype, for_device=False: (
        configs.KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_C=bc, num_warps=4)))
    z1, z2 = _inputs(37, 33, torch.float32, kernel_device, seed=13)
    want = _oracle(z1, z2, MU, True, 0.8)
    got = _run(_kernel(MU, True, "pairwise"), z1, z2, 0.8)
    for a, w in zip(got, want):
        assert float((a - w).abs().max()) <= 2e-6 * float(w.abs().max()) + 1e-7


@pytest.mark.parametrize("split", [(1, 3), (2, 2), (3, 1)])
@pytest.mark.parametrize("need_grad", [False, True])
def test_pairwise_split_column_stream(kernel_device, monkeypatch, split, need_grad):
    """The column stream split over programs (per-split fp32 partials, summed in a fixed
    order) gives the oracle's loss and gradients for any split, including the last split
    shorter than the others (3 column blocks in 2 splits)."""
    monkeypatch.setattr(configs, "pairwise_split", lambda b, k, g, cfg: split)
    z1, z2 = _inputs(37, 33, torch.float32, kernel_device, seed=14)
    if not need_grad:
        z1, z2 = z1.detach(), z2.detach()
        with torch.no_grad():
            got = ops.spectral_loss(z1, z2, MU, True, "pairwise")
        want = _oracle(z1.requires_grad_(), z2.requires_grad_(), MU, True, 1.0)[0]
        assert float((got.cpu().double() - want).abs()) <= 2e-6 * float(want.abs()) + 1e-7
        return
    want = _oracle(z1, z2, MU, True, 0.7)
    got = _run(_kernel(MU, True, "pairwise"), z1, z2, 0.7)
    for a, w in zip(got, want):
        assert float((a - w).abs().max()) <= 2e-6 * float(w.abs().max()) + 1e-7


def test_pairwise_grid_fills_the_device_at_benchmark_shapes():
    """Issue 14: without a gradient the grid was B/64 programs (16 at B = 1024, 4 at 256)."""
    for b in (256, 512, 1024, 2048, 4096):
        for k in (128, 1024, 8192):
            for dtype in (torch.float32, torch.bfloat16):
                cfg = configs.pairwise_config(b, k, dtype, for_device=True)
                n_split, per = configs.pairwise_split(b, k, False, cfg)
                n_cb = -(-b // cfg["BLOCK_N"])
                assert (n_split - 1) * per < n_cb <= n_split * per  # no empty split
                assert -(-b // cfg["BLOCK_M"]) * n_split >= 132, (b, k, dtype, n_split)


def test_cost_model_counts_idle_sms():
    """A launch of 4 programs keeps 4 of 132 SMs busy: the estimate says so."""
    assert ops._fill(4) == pytest.approx(4 / 132)
    assert ops._fill(132) == 1.0 and ops._fill(133) == pytest.approx(133 / 264)


@pytest.mark.parametrize("algorithm", ["pairwise", "matrix"])
def test_algorithms_agree_with_gram(kernel_device, algorithm):
    z1, z2 = _inputs(37, 33, torch.float32, kernel_device, seed=3)
    a = _run(_kernel(1.0, False, algorithm), z1, z2, 1.0)
    b = _run(_kernel(1.0, False, "gram"), z1, z2, 1.0)
    for x, y in zip(a, b):
        assert float((x - y).abs().max()) <= 1e-6 * float(y.abs().max())


def test_k_one_and_b_two(kernel_device):
    for b, k in [(2, 1), (3, 1)]:
        z1, z2 = _inputs(b, k, torch.float32, kernel_device, seed=4)
        for algorithm in ("pairwise", "matrix", "gram"):
            got = _run(_kernel(MU, True, algorithm), z1, z2, 1.3)
            want = _oracle(z1, z2, MU, True, 1.3)
            for a, w in zip(got, want):
                assert float((a - w).abs().max()) <= 2e-6 * float(w.abs().max()) + 1e-7


@pytest.mark.parametrize("algorithm", ["pairwise", "matrix", "gram"])
def test_deterministic_bits(kernel_device, algorithm):
    z1, z2 = _inputs(37, 33, torch.float32, kernel_device, seed=5)
    a = _run(_kernel(MU, True, algorithm), z1, z2, 1.0)
    b = _run(_kernel(MU, True, algorithm), z1, z2, 1.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("b,k", [(7, 33), (37, 5)])
def test_forward_only_skips_gradient_and_matches(kernel_device, b, k):
    z1, z2 = _inputs(b, k, torch.float32, kernel_device, seed=6)
    for algorithm in ("pairwise", "matrix", "gram"):
        loss, g1, g2 = ops.spectral_loss_fwd(z1.detach(), z2.detach(), MU, True, algorithm, False)
        assert g1.numel() == 0 and g2.numel() == 0
        with torch.no_grad():
            loss2 = ops.spectral_loss(z1, z2, MU, True, algorithm)
        want = _oracle(z1, z2, MU, True, 1.0)[0]
        assert abs(float(loss) - float(want)) <= 2e-6 * abs(float(want))
        assert torch.equal(loss, loss2)


def test_backward_without_saved_gradient_raises(kernel_device):
    z1, z2 = _inputs(7, 5, torch.float32, kernel_device)
    loss, _, _ = ops.spectral_loss_fwd(z1, z2, MU, True, "gram", False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.backward()


def test_cost_model_picks_by_shape():
    for dtype in (torch.float32, torch.bfloat16):
        for need_grad in (False, True):
            # B << k: S's tiles; with a gradient S written once (the pairwise kernel would
            # recompute each tile once per 64 gradient columns: the H200 run of 15384f2
            # measured its fwd+bwd at 3.75 ms at B = 256, k = 8192, bf16)
            want = "matrix" if need_grad else "pairwise"
            assert ops.choose_algorithm(256, 8192, dtype, need_grad) == want
            assert ops.choose_algorithm(64, 8192, dtype, need_grad) != "gram"
            # B >> k: the Grams (at 8192×64 bf16 both paths are bound by host launches,
            # where the pairwise path's two beat the gram path's five)
            assert ops.choose_algorithm(32768, 128, dtype, need_grad) == "gram"
        # the pairwise kernel where its gradient needs no recomputation (k <= BLOCK_C)
        assert ops.choose_algorithm(1024, 16, dtype, True) in ("pairwise", "gram")
    est = ops.estimate_seconds(1024, 1024, torch.bfloat16, True)
    assert set(est) == set(ops.ALGORITHMS) and all(v > 0 for v in est.values())
    # without a gradient "matrix" runs the pairwise pass: the same estimate
    est = ops.estimate_seconds(256, 4096, torch.bfloat16, False)
    assert est["matrix"] == est["pairwise"]


def test_cost_model_prices_host_launches_and_rounded_grams():
    """Each algorithm costs at least its launches' host time: where the device time is a
    few µs (B = 256, k = 1024) the pairwise path (1 launch) beats the matrix path (3),
    which saves only modelled device µs there.  The bf16 gram path's products on rounded
    Grams are priced at the native dot rate (Barlow Twins and VICReg keep fp32 Γ:
    ``round_grams=False``); fp16 and fp32 are unaffected."""
    est = ops.estimate_seconds(256, 1024, torch.bfloat16, True)
    assert est["matrix"] == pytest.approx(3 * ops._HOST_LAUNCH_S)
    assert est["pairwise"] < est["matrix"]
    assert ops.model_choice(256, 1024, torch.bfloat16, True) == "pairwise"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        rounded = ops.estimate_seconds(8192, 2048, dtype, True)["gram"]
        kept = ops.estimate_seconds(8192, 2048, dtype, True, round_grams=False)["gram"]
        if dtype == torch.bfloat16:
            assert rounded < 0.6 * kept
        else:
            assert rounded == kept


def test_auto_runs_the_cost_model_choice(kernel_device):
    z1, z2 = _inputs(37, 5, torch.float32, kernel_device, seed=7)
    choice = ops.choose_algorithm(37, 5, torch.float32, True)
    a = _run(_kernel(MU, True, "auto"), z1, z2, 1.0)
    b = _run(_kernel(MU, True, choice), z1, z2, 1.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_functional_triton_backend(kernel_device):
    z1, z2 = _inputs(7, 5, torch.float32, kernel_device, seed=8)
    got = Fn.spectral_contrastive_loss(z1, z2, mu=MU, backend="triton")
    want = reference.spectral_loss(z1.detach().cpu().double(), z2.detach().cpu().double(), MU)
    assert abs(float(got.detach()) - float(want)) <= 2e-6 * abs(float(want))


@pytest.mark.parametrize("algorithm", ["pairwise", "matrix", "gram"])
def test_opcheck(kernel_device, algorithm):
    z1, z2 = _inputs(7, 5, torch.float32, kernel_device, seed=9)
    torch.library.opcheck(ops.spectral_loss_fwd, (z1, z2, MU, True, algorithm, True))
    torch.library.opcheck(ops.spectral_loss_fwd, (z1.detach(), z2.detach(), MU, False, algorithm, False))


def test_torch_compile_fullgraph(kernel_device):
    Fn.load_kernels("triton")  # functional form: import the op outside the compiled region

    def f(a, b):
        return Fn.spectral_contrastive_loss(a, b, mu=MU, clip=True, algorithm="auto", backend="triton")

    z1, z2 = _inputs(7, 5, torch.float32, kernel_device, seed=10)
    torch._dynamo.reset()
    got = _run(torch.compile(f, fullgraph=True), z1, z2, 1.1)
    want = _run(f, z1, z2, 1.1)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_import_without_triton_raises_importerror():
    code = ("import sys; sys.modules['triton'] = None\n"
            "for name in ('spectral', 'minc'):\n"
            "    try:\n        __import__('minc_kernels.ops.' + name)\n"
            "    except ImportError:\n        print('IMPORTERROR', name)\n"
            "from minc_kernels import _backend\n"
            "print('STATUS', _backend.op_status('spectral')[0], _backend.op_status('minc')[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "IMPORTERROR spectral" in out.stdout and "IMPORTERROR minc" in out.stdout, out.stderr
    assert "STATUS False False" in out.stdout, out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("b,k", [(1024, 256), (256, 2048), (4099, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ["pairwise", "matrix", "gram", "auto"])
def test_gpu_large_shapes(b, k, dtype, algorithm):
    z1, z2 = _inputs(b, k, dtype, torch.device("cuda"), seed=11)
    g = 0.8
    want = _oracle(z1, z2, MU, True, g)
    got = _run(_kernel(MU, True, algorithm), z1, z2, g)
    if dtype == torch.float32:
        for a, w in zip(got, want):
            assert float((a - w).abs().max()) <= 1e-5 * float(w.abs().max()) + 1e-7
    else:
        eager = _run(lambda a, c: reference.spectral_loss(a, c, MU, True, "pairwise"), z1, z2, g)
        eps = torch.finfo(dtype).eps
        for a, e, w in zip(got, eager, want):
            err, err_eager = float((a - w).abs().max()), float((e - w).abs().max())
            assert err <= 3 * err_eager + 0.5 * eps * float(w.abs().max())
