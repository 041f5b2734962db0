"""The Gram layer's two implementations (MINC_KERNELS_GRAM=triton|cublas) agree on every
launcher, and the losses on top of them agree with the eager reference under both."""
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from minc_kernels.ops import gram as G  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-5, atol=2e-5),
       torch.float16: dict(rtol=2e-5, atol=2e-5)}


def _both(monkeypatch, fn):
    out = {}
    for backend in G.GRAM_IMPLS:
        monkeypatch.setenv(G.GRAM_ENV, backend)
        out[backend] = fn()
    return out["triton"], out["cublas"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,k", [(19, 24), (40, 17)])
def test_launchers_agree(monkeypatch, dtype, b, k):
    g = torch.Generator().manual_seed(b * k)
    x = (torch.randn(b, k, generator=g) * 0.3).to(dtype).to(DEV)
    y = (torch.randn(b, k, generator=g) * 0.3).to(dtype).to(DEV)
    m = torch.randn(k, k, generator=g).to(DEV)
    m = (m + m.T) / 2
    d = torch.randn(b, generator=g).to(DEV)
    tol = TOL[dtype]
    for t_out, c_out in [
        _both(monkeypatch, lambda: G.gram(x)),
        _both(monkeypatch, lambda: G.gram_dot(x, m)),
        _both(monkeypatch, lambda: G.cross_gram(x, y)),
    ]:
        torch.testing.assert_close(c_out, t_out, **tol)
    for gha in (False, True):
        for need_grad in (False, True):
            ta, ca = _both(monkeypatch, lambda: G.rowmat(x, m, y, d, 0.7, -0.3, 0.2, gha, need_grad))
            for tv, cv in zip(ta, ca):
                if tv is None:
                    assert cv is None
                else:
                    torch.testing.assert_close(cv, tv, **tol)


@pytest.mark.parametrize("b,k", [(19, 32), (40, 48), (37, 17)])
def test_rowmat_on_a_rounded_g_agrees_on_every_tiling_and_backend(monkeypatch, b, k):
    """A G already in the rows' bf16 (MODE 4): the default tiles, the wide ones
    (MINC_KERNELS_GRAM=triton_wide; unaligned rows keep the default) and cuBLAS give one
    result, against a float64 product of the same bf16 operands.  triton_wide changes no
    other launcher."""
    g = torch.Generator().manual_seed(b * k)
    x = (torch.randn(b, k, generator=g) * 0.3).to(torch.bfloat16).to(DEV)
    y = (torch.randn(b, k, generator=g) * 0.3).to(torch.bfloat16).to(DEV)
    m = torch.randn(k, k, generator=g)
    m = ((m + m.T) / 2).to(torch.bfloat16).to(DEV)
    d = torch.randn(b, generator=g).to(DEV)
    rowmat_calls = []  # the tiles each rowmat launch is given
    real = G.configs.rowmat_config
    monkeypatch.setattr(G.configs, "rowmat_config",
                        lambda *a, **kw: rowmat_calls.append(real(*a, **kw)) or rowmat_calls[-1])
    q = x.double() @ m.double().T
    want_grad = 0.7 * q + (-0.3 + 0.2 * d.double())[:, None] * y.double()
    got = {}
    for backend in ("triton", "triton_wide", "cublas"):
        monkeypatch.setenv(G.GRAM_ENV, backend)
        rowmat_calls.clear()
        got[backend] = G.rowmat(x, m, y, d, 0.7, -0.3, 0.2, False, True)
        quad, cross, grad = got[backend]
        torch.testing.assert_close(quad.double(), (x.double() * q).sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cross.double(), (x.double() * y.double()).sum(),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5)
        if backend != "cublas":
            (cfg,) = rowmat_calls
            assert cfg == real(k, x.dtype, b=b, wide=backend == "triton_wide"), backend
    # the wide tiling differs from the default (on a GPU: for rows and row counts that are
    # multiples of 16 only)
    differs = real(k, x.dtype, b=b, wide=True) != real(k, x.dtype, b=b)
    assert differs == (G.interpreting() or (k % 16 == 0 and b % 16 == 0))
    # a fp32 G (the split's dots) and the other launchers have no wide tiling
    monkeypatch.setenv(G.GRAM_ENV, "triton_wide")
    assert G.gram_backend("rowmat", x) == G.gram_backend("gram", x) == "triton"
    assert G.gram_backend("rowmat_rounded", x) == "triton_wide"
    rowmat_calls.clear()
    G.rowmat(x, m.float(), y, d, 0.7, -0.3, 0.2, False, True)
    assert rowmat_calls == [real(k, x.dtype, b=b)]


def test_unknown_gram_backend_is_named(monkeypatch):
    monkeypatch.setenv(G.GRAM_ENV, "cutlass")
    with pytest.raises(ValueError, match="MINC_KERNELS_GRAM"):
        G.gram(torch.randn(4, 3, device=DEV))


@pytest.mark.parametrize("backend", G.GRAM_IMPLS)
def test_rowmat_into_a_given_destination_and_in_place_jacobian(monkeypatch, backend):
    """``rowmat(out=)`` through a transposed view gives the same bits as its own contiguous
    buffer; ``col_stats_backward(in_place=True)`` the same bits as separate outputs; both
    refuse destinations of the wrong shape, dtype or layout and write nothing then."""
    monkeypatch.setenv(G.GRAM_ENV, backend)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 24, generator=g).to(DEV)
    m = torch.randn(24, 24, generator=g).to(DEV)
    d = torch.randn(20, generator=g).to(DEV)
    want = G.rowmat(x, m, x, d, 0.7, -0.3, 0.2, False, True)
    buf = torch.full((24, 20), float("nan"), device=DEV)
    got = G.rowmat(x, m, x, d, 0.7, -0.3, 0.2, False, True, out=buf.T)
    assert got[2].data_ptr() == buf.data_ptr()
    for w, v in zip(want, got):
        torch.testing.assert_close(v, w, rtol=0, atol=0)
    for bad in (torch.empty(24, 20, device=DEV), torch.empty(20, 24, dtype=torch.float64, device=DEV)):
        with pytest.raises(ValueError, match="out must be a float32 tensor of shape"):
            G.rowmat(x, m, x, d, 0.7, -0.3, 0.2, False, True, out=bad)
    with pytest.raises(ValueError, match="need_grad"):
        G.rowmat(x, m, x, d, 0.7, -0.3, 0.2, False, False, out=torch.empty(20, 24, device=DEV))

    za, zb = torch.randn(2, 20, 24, generator=g).to(DEV)
    for standardize in (True, False):
        na, nb, stats = G.col_stats(za, zb, standardize, 1e-5, transposed=False)
        gx, gy = torch.randn(2, 20, 24, generator=g).to(DEV)
        ref = G.col_stats_backward(gx, gy, na if standardize else None, nb if standardize else None,
                                   za, zb, stats, 0.1)
        gx2, gy2 = gx.clone(), gy.clone()
        ox, oy = G.col_stats_backward(gx2, gy2, na if standardize else None,
                                      nb if standardize else None, za, zb, stats, 0.1, in_place=True)
        assert ox.data_ptr() == gx2.data_ptr() and oy.data_ptr() == gy2.data_ptr()
        torch.testing.assert_close(ox, ref[0], rtol=0, atol=0)
        torch.testing.assert_close(oy, ref[1], rtol=0, atol=0)
        strided = gx.clone().T.contiguous().T
        keep = strided.clone()
        with pytest.raises(ValueError, match="in_place needs gx as a contiguous float32"):
            G.col_stats_backward(strided, gy.clone(), None, None, za, zb, stats, 0.0, in_place=True)
        assert torch.equal(strided, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_statistics_row_split_matches_one_slice(monkeypatch, dtype):
    """The column-statistics row split (issue 21/22: the grid filled when the column blocks
    alone leave SMs idle): per-slice moments merged by Chan's update, then per-slice outputs
    and sums, gives what one slice gives (to fp32 rounding of the merged sums; outputs in
    the storage dtype to one rounding), the float64 moments, and the same Jacobian in place."""
    monkeypatch.setattr(G, "COLSTATS_SPLIT_MIN_SECONDS", 0.0)  # small shapes split on a GPU too
    g = torch.Generator().manual_seed(11)
    b, k = 70, 12  # 70 = 4 slices of 16-row tiles (interpreter) with a short last one
    x = (torch.randn(b, k, generator=g) * 3 + 5).to(dtype).to(DEV)
    y = (torch.randn(b, k, generator=g) - 2).to(dtype).to(DEV)
    from minc_kernels.ops import configs
    slices, rows = G._colstats_split(b, k, 1 << 40, configs.colstats_config(k), DEV)
    assert slices > 1 and (slices - 1) * rows < b <= slices * rows
    one = lambda *a: (1, a[0])  # noqa: E731
    out_tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for standardize in (True, False):
        for transposed in (False, True):
            got = G.col_stats(x, y, standardize, 1e-5, transposed)
            with monkeypatch.context() as m:
                m.setattr(G, "_colstats_split", one)
                want = G.col_stats(x, y, standardize, 1e-5, transposed)
            torch.testing.assert_close(got[0], want[0], **out_tol)
            torch.testing.assert_close(got[1], want[1], **out_tol)
            torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-4)
            xd, yd = x.double(), y.double()
            m2 = ((xd - xd.mean(0)) ** 2).sum(0)
            torch.testing.assert_close(got[2][0].double(), xd.mean(0), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got[2][2].double(), m2, rtol=1e-5, atol=0)
            torch.testing.assert_close(got[2][9].double(), ((xd - yd) ** 2).sum(0), rtol=1e-5, atol=0)
            nx, ny, stats = got
            gx, gy = torch.randn(2, b, k, generator=g).to(DEV)
            args = (nx if standardize else None, ny if standardize else None, x, y, stats, 0.2)
            split = G.col_stats_backward(gx, gy, *args)
            with monkeypatch.context() as m:
                m.setattr(G, "_colstats_split", one)
                ref = G.col_stats_backward(gx, gy, *args)
            torch.testing.assert_close(split[0], ref[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(split[1], ref[1], rtol=1e-5, atol=1e-6)
            gx2, gy2 = gx.clone(), gy.clone()
            inplace = G.col_stats_backward(gx2, gy2, *args, in_place=True)
            assert inplace[0].data_ptr() == gx2.data_ptr()
            torch.testing.assert_close(inplace[0], split[0], rtol=0, atol=0)
            torch.testing.assert_close(inplace[1], split[1], rtol=0, atol=0)


@pytest.mark.parametrize("k", [5, 1500])  # 1500: two passes of the kernel's 1024 columns
@pytest.mark.parametrize("pairwise", [True, False])
def test_column_terms_match_the_float64_formulas(k, pairwise):
    """colstats_terms_kernel (one launch for the k-element terms of VICReg / Barlow Twins)
    against docs/math.md §7-8 in float64: columns on both sides of the variance hinge."""
    g = torch.Generator().manual_seed(k)
    n, lam, mu, nu, eps = 37, 0.7, 25.0, 1.3, 1e-4
    stats = torch.rand(10, k, generator=g, dtype=torch.float64) * 2 * (n - 1)  # var in [0, 2)
    stats[6:10] = torch.rand(4, k, generator=g, dtype=torch.float64) * 40
    s64 = stats.clone()
    stats = stats.float().to(DEV)
    alpha = 4.0 * nu / (k * (n - 1) ** 2)
    coef, base = G.col_terms(stats, n, True, pairwise, lam=lam, mu=mu, nu=nu, eps=eps,
                             alpha=alpha)
    std = torch.sqrt(s64[2:4] / (n - 1) + eps)
    assert (std < 1).any() and (std > 1).any()
    h = torch.where(std < 1, -mu / (2.0 * k * (n - 1) * std), torch.zeros_like(std))
    want_base = lam * s64[9].sum() / (n * k) + mu * 0.5 * torch.relu(1 - std).mean(1).sum()
    if pairwise:
        h = h - alpha * s64[6:8]
        want_base = want_base - nu * (s64[6:8] ** 2).sum() / ((n - 1) ** 2 * k)
    assert coef.shape == (2, k) and base.shape == ()
    torch.testing.assert_close(coef.cpu().double(), h, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(base.cpu().double(), want_base, rtol=1e-5, atol=1e-6)
    # Barlow Twins' N×N path: C_ii = Σ ẑa∘ẑb / N (from the stats), base = Σ (1 - C_ii)²
    # - λ Σ C_ii², and the diagonal 2 C_ii - 2 of ∂L/∂C
    c = s64[8] / n
    d, base = G.col_terms(stats, n, False, lam=lam)
    torch.testing.assert_close(d.cpu().double(), torch.stack([c, 2 * c - 2]), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(base.cpu().double(), ((1 - c) ** 2).sum() - lam * (c ** 2).sum(),
                               rtol=1e-5, atol=1e-5)


def _pair_inputs(b, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(b, k, generator=g) * 0.3).to(dtype).to(DEV) for _ in range(4)]
    ms = []
    for _ in range(2):
        m = torch.randn(k, k, generator=g)
        ms.append(((m + m.T) / 2).to(DEV))
    ds = [torch.randn(b, generator=g).to(DEV) for _ in range(2)]
    return xs, ms, ds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,k", [(19, 24), (40, 5)])  # k = 5: one tile, a row split of 4
def test_two_views_in_one_launch_give_the_bits_of_two(monkeypatch, dtype, b, k):
    """gram_pair and rowmat_pair (kernels' VIEWS = 2) against one launch per view, bit for
    bit: same tiles, same row slices, same partial sums.  Operands of different layouts
    (a transposed ``out``, a strided ``x``) fall back to two launches."""
    from benchmarks.cpu_host_overhead import LaunchStub
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    xs, ms, ds = _pair_inputs(b, k, dtype, b * k)
    pair = G.gram_pair(xs[0], xs[1])
    for got, x in zip(pair, xs[:2]):
        assert torch.equal(got, G.gram(x))
    for gha in (False, True):
        for need_grad in (False, True):
            for use_d in (False, True):
                views = [(xs[0], ms[0], xs[2], ds[0] if use_d else None, None),
                         (xs[1], ms[1], xs[3], ds[1] if use_d else None, None)]
                got = G.rowmat_pair(*views, 0.7, -0.3, 0.2, gha, need_grad)
                for (gq, gc, go), v in zip(got, views):
                    wq, wc, wo = G.rowmat(*v[:4], 0.7, -0.3, 0.2, gha, need_grad)
                    assert torch.equal(gq, wq) and torch.equal(gc, wc)
                    assert (go is None) == (wo is None) and (go is None or torch.equal(go, wo))
    # one launch each where the layouts match, two where they do not
    outs = [torch.empty(k, b, device=DEV).T, torch.empty(k, b, device=DEV).T]
    strided = torch.zeros(b, 2 * k, dtype=dtype, device=DEV)[:, ::2].copy_(xs[1])  # same values
    for second_x, second_out, launches in ((xs[1], outs[1], 1), (strided, outs[1], 2),
                                           (xs[1], torch.empty(b, k, device=DEV), 2)):
        with LaunchStub() as stub:
            G.gram_pair(xs[0], second_x)
            G.rowmat_pair((xs[0], ms[0], xs[2], None, outs[0]), (second_x, ms[1], xs[3], None, second_out),
                          1.0, 0.0, 0.0, False, True)
        assert dict(stub.counts) == {"moment_partial_kernel": 1 if second_x is xs[1] else 2,
                                     "rowmat_kernel": launches}
    got = G.rowmat_pair((xs[0], ms[0], xs[2], None, outs[0]), (strided, ms[1], xs[3], None, outs[1]),
                        1.0, 0.0, 0.0, False, True)
    want = G.rowmat(xs[1], ms[1], xs[3], None, 1.0, 0.0, 0.0, False, True)
    assert torch.equal(got[1][2], want[2]) and got[1][2] is outs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_g_and_its_transpose_pair_once_copied_into_one_layout(monkeypatch, dtype):
    """rowmat_pair of ``(x, G)`` and ``(x2, Gᵀ)`` (Barlow Twins' Γ and Γᵀ): two launches
    (the kernel takes one layout of G for both views); one once ``rounded`` copies them into
    one (2, k, k) buffer, with the bits of one call per rounded operand."""
    from benchmarks.cpu_host_overhead import LaunchStub
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    monkeypatch.setenv(G.ROWMAT_SPLIT_ENV, "always")
    xs, _, ds = _pair_inputs(19, 24, dtype, 5)
    m = torch.randn(24, 24, generator=torch.Generator().manual_seed(2)).to(DEV)
    views = [(xs[0], m, xs[2], ds[0], None), (xs[1], m.T, xs[3], ds[1], None)]
    with LaunchStub() as stub:
        G.rowmat_pair(*views, 0.7, -0.3, 0.2, False, True)
    assert stub.counts["rowmat_kernel"] == 2
    half = torch.bfloat16
    both = G.rounded(m, m.T, half)
    assert both.is_contiguous() and torch.equal(both[1], m.T.to(half))
    assert torch.equal(both[0], m.to(half))
    xb = [x.to(half) for x in xs]
    views = [(xb[0], both[0], xb[2], ds[0], None), (xb[1], both[1], xb[3], ds[1], None)]
    with LaunchStub() as stub:
        G.rowmat_pair(*views, 0.7, -0.3, 0.2, False, True)
    assert stub.counts["rowmat_kernel"] == 1
    for gha in (False, True):
        got = G.rowmat_pair(*views, 0.7, -0.3, 0.2, gha, True)
        for g_t, v in zip(got, views):
            want = G.rowmat(*v[:4], 0.7, -0.3, 0.2, gha, True)
            assert all(torch.equal(a, b) for a, b in zip(g_t, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rowmat_on_a_half_g_is_one_native_product(monkeypatch, dtype):
    """A G already in the rows' half dtype (the spectral matrix path's S'): MODE 4, one dot
    per tile; the fp32 product of the half values, to fp32 rounding."""
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    xs, _, _ = _pair_inputs(19, 24, dtype, 6)
    m = torch.randn(24, 24, generator=torch.Generator().manual_seed(3)).to(DEV).to(dtype)
    for g in (m, m.T):
        q = G.rowmat(xs[1], g, xs[3], None, 1.0, 0.0, 0.0, False, True)[2]
        torch.testing.assert_close(q, xs[1].float() @ g.float().T, rtol=1e-5, atol=1e-5)


def test_pairs_under_cublas_are_two_calls(monkeypatch):
    monkeypatch.setenv(G.GRAM_ENV, "cublas")
    xs, ms, ds = _pair_inputs(12, 6, torch.float32, 0)
    for got, x in zip(G.gram_pair(xs[0], xs[1]), xs[:2]):
        assert torch.equal(got, G.gram(x))
    got = G.rowmat_pair((xs[0], ms[0], xs[2], ds[0], None), (xs[1], ms[1], xs[3], ds[1], None),
                        0.5, 0.1, 0.2, False, True)
    want = G.rowmat(xs[1], ms[1], xs[3], ds[1], 0.5, 0.1, 0.2, False, True)
    assert all(torch.equal(a, b) for a, b in zip(got[1], want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss,algorithm", [("spectral", "gram"), ("vicreg", "gram"),
                                            ("vicreg", "pairwise"), ("barlow_twins", "pairwise"),
                                            ("barlow_twins", "gram")])
def test_losses_form_both_views_grams_in_one_launch(monkeypatch, loss, algorithm, dtype):
    """fwd+bwd: one ``moment_partial_kernel`` and one ``rowmat_kernel`` launch for both views
    (two each before); Barlow Twins' k×k path multiplies by ``Γ`` and ``Γᵀ``: one launch
    for bf16 rows (both rounded into one buffer), two for fp32 (two layouts; its Gram is a
    cross_gram)."""
    import minc_kernels.functional as Fn
    from benchmarks.cpu_host_overhead import LaunchStub
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(12, 10, generator=g).to(dtype).to(DEV).requires_grad_()
            for _ in range(2))
    call = {"spectral": lambda: Fn.spectral_contrastive_loss(a, b, algorithm=algorithm, backend="triton"),
            "vicreg": lambda: Fn.vicreg_loss(a, b, algorithm=algorithm, backend="triton"),
            "barlow_twins": lambda: Fn.barlow_twins_loss(a, b, algorithm=algorithm, backend="triton")}[loss]
    with LaunchStub() as stub:
        call().backward()
    k_by_k = (loss, algorithm) == ("barlow_twins", "gram")
    assert stub.counts["moment_partial_kernel"] == (0 if k_by_k else 1), dict(stub.counts)
    two = k_by_k and dtype == torch.float32
    assert stub.counts["rowmat_kernel"] == (2 if two else 1), dict(stub.counts)


@pytest.mark.parametrize("dtype,mode", [(torch.float32, 0), (torch.bfloat16, 4),
                                        (torch.float16, 2)])
@pytest.mark.parametrize("loss", ["spectral", "vicreg", "barlow_twins"])
def test_k_by_k_products_take_operands_rounded_for_bf16_only(monkeypatch, rowmat_calls, loss,
                                                             dtype, mode):
    """The k×k paths' gradient products: bf16 rows multiply by the fp32 operand (the
    spectral Grams, Barlow Twins' Γ and Γᵀ) rounded to bf16 (MODE 4, one native dot per
    tile), as eager autograd rounds it (``rounds_operand``); fp16 rows by the fp32 operand
    as two TF32 pieces (MODE 2), fp32 rows strict fp32 (MODE 0).  With the presplit forced
    on, so bf16 would otherwise take MODE 3, as VICReg's does: its Γ holds the variance
    hinge's derivative on the diagonal, which eager forms in fp32 (rounded, it measured up
    to 1.3× eager's gradient error)."""
    import minc_kernels.functional as Fn
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    monkeypatch.setenv(G.ROWMAT_SPLIT_ENV, "always")
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randn(12, 10, generator=g).to(dtype).to(DEV).requires_grad_()
            for _ in range(2))
    fn = {"spectral": Fn.spectral_contrastive_loss, "vicreg": Fn.vicreg_loss,
          "barlow_twins": Fn.barlow_twins_loss}[loss]
    fn(a, b, algorithm="gram", backend="triton").backward()
    if loss == "vicreg" and mode == 4:
        mode = 3  # G's bf16 pieces, split beforehand
    seen = {c[:2] for c in rowmat_calls}
    assert seen == {(mode, dtype if mode in (3, 4) else torch.float32)}, seen


@pytest.mark.parametrize("algorithm", ["gram", "pairwise"])
def test_vicreg_pairs_views_only_below_the_memory_threshold(monkeypatch, algorithm):
    """VICReg frees one view's k×k (N×N) matrix before forming the other's: pairing them
    keeps both alive, so it pairs only below ops.vicreg.PAIR_MAX_BYTES.  Above it: two
    launches per pass, and the same gradient bits.  The loss's off-diagonal sum is one
    reduction over both views' matrices when they share a buffer and two added when they
    do not: the same terms in another order, equal to a few fp32 ulps."""
    from benchmarks.cpu_host_overhead import LaunchStub
    from minc_kernels.ops import vicreg as V
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(12, 10, generator=g).to(DEV) for _ in range(2))
    got = {}
    for limit, launches in ((V.PAIR_MAX_BYTES, 1), (0, 2)):
        monkeypatch.setattr(V, "PAIR_MAX_BYTES", limit)
        with LaunchStub() as stub:
            V.vicreg_forward(a, b, 25.0, 25.0, 1.0, 1e-4, algorithm, True)
        assert stub.counts["moment_partial_kernel"] == stub.counts["rowmat_kernel"] == launches
        got[launches] = V.vicreg_forward(a, b, 25.0, 25.0, 1.0, 1e-4, algorithm, True)
    (loss1, *grads1), (loss2, *grads2) = got[1], got[2]
    assert all(torch.equal(x, y) for x, y in zip(grads1, grads2))
    torch.testing.assert_close(loss1, loss2, rtol=8 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.parametrize("b,k", [(19, 24), (40, 17)])
def test_rowmat_with_g_split_beforehand_gives_the_same_bits(monkeypatch, b, k):
    """bf16 rows against a fp32 G: the bf16 pieces of G formed once (split_bf16x3_kernel,
    MODE 3, what large calls do) give exactly the bits of forming them in every program
    (MODE 1): the same pieces, the same dots in the same order.  Also a strided G (Γᵀ, as
    Barlow Twins passes), the GHA ordering, two views, and the variable's check."""
    from benchmarks.cpu_host_overhead import LaunchStub
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    xs, ms, ds = _pair_inputs(b, k, torch.bfloat16, 7 * b + k)
    ms[1] = torch.randn(k, k, generator=torch.Generator().manual_seed(1)).to(DEV) * 3
    got = {}
    for split in ("never", "always"):
        monkeypatch.setenv(G.ROWMAT_SPLIT_ENV, split)
        out = []
        for g in (ms[0], ms[1].T):
            for gha in (False, True):
                for need_grad in (False, True):
                    out.append(G.rowmat(xs[0], g, xs[2], ds[0], 0.7, -0.3, 0.2, gha, need_grad))
        out.append(G.rowmat_pair((xs[0], ms[0], xs[2], None, None), (xs[1], ms[1], xs[3], None, None),
                                 1.0, 0.5, 0.0, False, True))
        with LaunchStub() as stub:
            G.rowmat(xs[0], ms[0], xs[2], None, 1.0, 0.0, 0.0, False, True)
        got[split] = (out, dict(stub.counts))
    assert got["never"][1] == {"rowmat_kernel": 1}
    assert got["always"][1] == {"split_bf16x3_kernel": 1, "rowmat_kernel": 1}
    flat = [[t for r in run for t in (r if isinstance(r, list) else [r])] for run in
            (got["never"][0], got["always"][0])]
    for a, w in zip(*flat):
        for ta, tw in zip(a, w):
            assert (ta is None) == (tw is None) and (ta is None or torch.equal(ta, tw))
    # the pieces: hi + mid + lo is G to about 24 bits
    pieces = G.split_bf16x3(ms[1].T)
    torch.testing.assert_close(pieces.float().sum(0), ms[1].T, rtol=2 ** -22, atol=0)
    monkeypatch.setenv(G.ROWMAT_SPLIT_ENV, "sometimes")
    with pytest.raises(ValueError, match="MINC_KERNELS_ROWMAT_SPLIT"):
        G.rowmat(xs[0], ms[0], xs[2], None, 1.0, 0.0, 0.0, False, True)


def test_rowmat_splits_g_beforehand_only_for_large_bf16_calls():
    from minc_kernels.ops import configs
    assert configs.rowmat_presplit(4096, 4096) and configs.rowmat_presplit(2048, 256)
    assert not configs.rowmat_presplit(1024, 4096) and not configs.rowmat_presplit(8192, 128)
    # the pieces (6k² bytes) stay within ROWMAT_PRESPLIT_MAX_BYTES: not at k = 8192 (384 MiB)
    assert not configs.rowmat_presplit(8192, 8192)


@pytest.mark.parametrize("n_a,a_stride", [(1, 1), (300, 1), (37, 2)])  # 300: two passes
@pytest.mark.parametrize("p_shape", [(), (5,), (600,), (7, 3)])
@pytest.mark.parametrize("wa2", [None, -1.0])
def test_combine_matches_the_torch_formula(n_a, a_stride, p_shape, wa2):
    """``combine``: ``wa·Σ a + wp·(Σ p + wa2·Σ a²)`` in one launch, on strided ``a`` and
    0-2 dimensional ``p`` with rows apart (rowmat's (programs, 2) partials, the pairwise
    kernel's chunk), against the same formula in float64."""
    g = torch.Generator().manual_seed(n_a * 7 + len(p_shape))
    a = torch.randn(n_a * a_stride, generator=g).to(DEV)[::a_stride]
    if len(p_shape) == 2:  # rows 6 apart, columns contiguous
        p = torch.randn(p_shape[0], 2 * p_shape[1], generator=g).to(DEV)[:, :p_shape[1]]
    else:
        p = torch.randn(p_shape, generator=g).to(DEV)
    wa, wp = 0.37, -1.9
    got = G.combine(a, wa, p, wp, wa2)
    a64, p64 = a.double(), p.double()
    want = wa * a64.sum() + wp * (p64.sum() + (wa2 * (a64 * a64).sum() if wa2 else 0.0))
    assert got.shape == () and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if len(p_shape) == 2:
        with pytest.raises(ValueError, match="p's last dimension must be contiguous"):
            G.combine(a, wa, p.T, wp)


def test_combine_leaves_out_an_unused_square_term():
    """Without ``wa2`` the ``Σ a²`` term is not formed: an infinite ``a`` gives ±inf, not
    the NaN of ``0·inf``."""
    a = torch.tensor([float("inf"), 1.0], device=DEV)
    p = torch.ones(3, device=DEV)
    assert G.combine(a, 1.0, p, 1.0).item() == float("inf")
    assert torch.isnan(G.combine(a, 1.0, p, 1.0, 0.0))


@pytest.mark.parametrize("backend", G.GRAM_IMPLS)
def test_rowmat_pair_raw_partials_sum_to_the_pair_sums(monkeypatch, backend):
    """``rowmat_pair(raw=True)``: a (2, programs, 2) tensor whose per-view sums are the
    pair's ``(Σ x∘q, Σ x∘y)`` (Triton: the kernel's partials, one launch; cuBLAS: the two
    calls' sums), and the same gradients."""
    monkeypatch.setenv(G.GRAM_ENV, backend)
    g = torch.Generator().manual_seed(5)
    xs = [(torch.randn(33, 20, generator=g) * 0.3).to(DEV) for _ in range(4)]
    gs = [torch.randn(20, 20, generator=g).to(DEV) for _ in range(2)]
    first, second = (xs[0], gs[0], xs[1], None, None), (xs[2], gs[1], xs[3], None, None)
    want = G.rowmat_pair(first, second, 0.5, -0.25, 0.0, False, True)
    part, outs = G.rowmat_pair(first, second, 0.5, -0.25, 0.0, False, True, raw=True)
    assert part.dim() == 3 and part.shape[0] == 2 and part.shape[2] == 2 and part.is_contiguous()
    for v in range(2):
        torch.testing.assert_close(part[v].sum(dim=0), torch.stack(want[v][:2]), rtol=1e-6,
                                   atol=1e-6)
        assert torch.equal(outs[v], want[v][2])


@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
def test_n_by_n_losses_combine_their_partials_in_one_launch(loss):
    """Barlow Twins' and VICReg's N×N paths with the gradient take their loss from the
    pair's partials by one ``combine_kernel`` launch (the partials' sum and one or two
    adds before); the one torch op left in the forward is the N×N Grams' row-slice sum,
    where ``gram_pair`` splits its rows (launches stubbed).  Without the gradient too:
    Barlow Twins from ``gram_dot``'s partials (a sum and an add before), VICReg from one
    ``gram_finish`` pass over the Grams' slices (a slice sum and a dot before)."""
    from benchmarks.cpu_host_overhead import LaunchStub, count_ops
    from minc_kernels.ops import barlow_twins as ob, vicreg as ov
    g = torch.Generator().manual_seed(6)
    za = torch.randn(9, 24, generator=g).requires_grad_()
    zb = torch.randn(9, 24, generator=g).requires_grad_()
    call = (lambda: ob.barlow_twins_loss(za, zb, 5e-3, "pairwise")) if loss == "barlow_twins" \
        else (lambda: ov.vicreg_loss(za, zb, 25.0, 25.0, 1.0, 1e-4, "pairwise"))
    for grad in (True, False):
        with torch.set_grad_enabled(grad), LaunchStub() as stub:
            ops = count_ops(call)
        assert stub.counts["combine_kernel"] == 1, dict(stub.counts)
        if loss == "vicreg" and not grad:
            assert stub.counts["gram_finish_kernel"] == 1, dict(stub.counts)
            assert ops["aten_kernel_op_names"] == {}, ops
        else:
            assert ops["aten_kernel_op_names"] in ({}, {"aten::sum": 1}), ops


@pytest.mark.parametrize("diag", ["zero", "coef", "barlow"])
@pytest.mark.parametrize("views,split,out", [
    (1, 1, "in_place"), (2, 3, "in_place"), (1, 2, "in_place"), (2, 1, "no_grad"),
    (1, 3, "no_grad"), (1, 1, "bf16_transposed"), (1, 2, "bf16_transposed")])
def test_gram_finish_matches_float64(monkeypatch, diag, views, split, out):
    """gram_finish (one pass over a Gram's row slices): G = scale·Σ_s part[s] with the
    slices added in order; per tile Σ_{i≠j} G_ij² and Σ_i G_ii² (Barlow Twins: Σ (1 - G_ii)²)
    summing to their float64 values; Γ = mul·G off the diagonal and 0 / coef / 2 G_ii - 2 on
    it, fp32 in place over the first slice (each view's, whatever the slice count) with the
    exact bits of the fp32 formula, or rounded to bf16 as torch rounds, with Γᵀ beside it."""
    from minc_kernels.ops import configs
    monkeypatch.setattr(configs, "FINISH_BLOCK", 16)
    k = 37  # 3×3 tiles of 16, the last ones partial
    g = torch.Generator().manual_seed(views * 10 + split)
    part = (torch.randn(views, split, k, k, generator=g) * 2).to(DEV)
    coef = torch.randn(views, k, generator=g).to(DEV)
    scale, mul = 0.25, -1.5
    want = part[:, 0].clone()
    for s in range(1, split):
        want = want + part[:, s]
    want = want * scale
    w64 = want.double()
    eye = torch.eye(k, dtype=torch.bool, device=DEV)
    d64 = torch.diagonal(w64, dim1=1, dim2=2)
    want_off = w64.masked_fill(eye, 0).pow(2).sum()
    want_diag = ((1 - d64) ** 2).sum() if diag == "barlow" else (d64 ** 2).sum()
    gam_want = (want * mul).masked_fill(eye, 0)
    dvals = {"zero": torch.zeros_like(coef), "coef": coef,
             "barlow": 2.0 * torch.diagonal(want, dim1=1, dim2=2) - 2.0}[diag]
    torch.diagonal(gam_want, dim1=1, dim2=2).copy_(dvals)
    first = part[:, 0]
    sq, gam = G.gram_finish(part, scale=scale, mul=mul, diag=diag,
                            coef=coef if diag == "coef" else None, need_grad=out != "no_grad",
                            out_dtype=torch.bfloat16 if out == "bf16_transposed" else torch.float32,
                            transpose=out == "bf16_transposed")
    assert sq.shape == (views * 9, 2) and sq.dtype == torch.float32
    torch.testing.assert_close(sq[:, 0].double().sum(), want_off, rtol=1e-5, atol=0)
    torch.testing.assert_close(sq[:, 1].double().sum(), want_diag, rtol=1e-5, atol=0)
    if out == "no_grad":
        assert gam is None
    elif out == "in_place":
        assert gam.data_ptr() == first.data_ptr() and gam.shape == (views, k, k)
        assert torch.equal(gam, gam_want)
    else:
        assert gam.shape == (2, k, k) and gam.dtype == torch.bfloat16 and gam.is_contiguous()
        assert torch.equal(gam[0], gam_want[0].to(torch.bfloat16))
        assert torch.equal(gam[1], gam_want[0].T.to(torch.bfloat16))


def test_gram_finish_names_bad_arguments():
    part = torch.zeros(1, 1, 4, 4, device=DEV)
    for bad in (part.double(), part[0], part.expand(1, 1, 4, 4).transpose(2, 3)[..., :3]):
        with pytest.raises(ValueError, match="part must be a contiguous float32"):
            G.gram_finish(bad)
    with pytest.raises(ValueError, match="diag must be one of"):
        G.gram_finish(part, diag="ones")
    with pytest.raises(ValueError, match=r"coef as a float32 \(1, 4\)"):
        G.gram_finish(part, diag="coef", coef=torch.zeros(2, 4, device=DEV))
    with pytest.raises(ValueError, match="transpose needs one view"):
        G.gram_finish(torch.zeros(2, 1, 4, 4, device=DEV), transpose=True)


@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_by_k_paths_finish_their_grams_in_one_pass(monkeypatch, loss, dtype):
    """Barlow Twins' and VICReg's k×k paths: the Gram's row slices summed, its Frobenius
    partials and Γ formed by one gram_finish_kernel launch, the loss from them by one
    combine_kernel launch: no torch op in the forward (before: the slices' sum, then five
    to eight ops on the k×k matrix), with and without the gradient.  Barlow Twins' bf16
    rows take Γ and Γᵀ in one rowmat launch; fp32 rows two (Γ and its transposed view),
    whose unused partials one op joins."""
    from benchmarks.cpu_host_overhead import LaunchStub, count_ops
    from minc_kernels.ops import barlow_twins as ob, vicreg as ov
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    monkeypatch.setattr(G, "COLSTATS_SPLIT_MIN_SECONDS", 1.0)  # one column-stats launch
    g = torch.Generator().manual_seed(8)
    za, zb = ((torch.randn(40, 12, generator=g) * 0.5).to(dtype) for _ in range(2))
    gram_kernel = "cross_gram_kernel" if loss == "barlow_twins" else "moment_partial_kernel"
    for need_grad in (True, False):
        call = (lambda: ob.barlow_twins_forward(za, zb, 5e-3, "gram", need_grad)) \
            if loss == "barlow_twins" else \
            (lambda: ov.vicreg_forward(za, zb, 25.0, 25.0, 1.0, 1e-4, "gram", need_grad))
        two = need_grad and loss == "barlow_twins" and dtype == torch.float32
        with LaunchStub() as stub:
            ops = count_ops(call)
        assert ops["aten_kernel_op_names"] == ({"aten::cat": 1} if two else {}), ops
        want = {"colstats_kernel": 1, gram_kernel: 1, "gram_finish_kernel": 1,
                "combine_kernel": 1}
        if loss == "vicreg":
            want["colstats_terms_kernel"] = 1
        if need_grad:
            want["rowmat_kernel"] = 2 if two else 1
            want["colstats_backward_kernel"] = 1
        assert dict(stub.counts) == want, (need_grad, dict(stub.counts))


def test_gram_dot_partials_fill_their_own_slots(monkeypatch):
    """gram_dot's raw per-program partials (for combine): the programs that skip a tile
    below the diagonal write 0 to their slot, so the buffer needs no zero-fill launch:
    fresh buffers filled with NaN still sum to <M, XᵀX>_F."""
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 37, generator=g).to(DEV)  # 3×3 tiles of 16 on the interpreter
    m = torch.randn(37, 37, generator=g).to(DEV)
    m = (m + m.T) / 2
    monkeypatch.setattr(torch, "empty", nan_empty)
    part = G.gram_dot(x, m, raw=True)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert part.dim() == 1 and bool(torch.isfinite(part).all())
    want = (x.double().T @ x.double() * m.double()).sum()
    torch.testing.assert_close(part.double().sum(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("out", ["in_place", "bf16", "no_grad"])
def test_gram_finish_pair_dots_the_two_grams(monkeypatch, split, out):
    """gram_finish(pair=True), the spectral Gram path's pass: each program sums both views'
    slices in order, writes per tile Σ G_0∘G_1 (summing to <G1, G2>_F in float64) and 0,
    and stores the Grams themselves: fp32 in place over the first slices (the exact fp32
    sums) or rounded to bf16 as torch rounds."""
    from minc_kernels.ops import configs
    monkeypatch.setattr(configs, "FINISH_BLOCK", 16)
    k = 37
    g = torch.Generator().manual_seed(20 + split)
    part = (torch.randn(2, split, k, k, generator=g) * 2).to(DEV)
    want = part[:, 0].clone()
    for s in range(1, split):
        want = want + part[:, s]
    first = part[:, 0]
    sq, gam = G.gram_finish(part, pair=True, need_grad=out != "no_grad",
                            out_dtype=torch.bfloat16 if out == "bf16" else torch.float32)
    assert sq.shape == (9, 2)
    torch.testing.assert_close(sq[:, 0].double().sum(), (want[0].double() * want[1]).sum(),
                               rtol=1e-5, atol=1e-5)
    assert not bool(sq[:, 1].any())
    if out == "no_grad":
        assert gam is None
    elif out == "in_place":
        assert gam.data_ptr() == first.data_ptr() and torch.equal(gam, want)
    else:
        assert gam.shape == (2, k, k) and torch.equal(gam, want.to(torch.bfloat16))
    with pytest.raises(ValueError, match="pair needs two views"):
        G.gram_finish(part[:1], pair=True)
