"""The gradient-noise estimator of examples/minc_train/studies/grad_variance.py on a toy problem with a
closed-form answer, and a smoke run of the study's CLI (--quick) on a generated image folder.

Toy problem: linear regression with x ~ N(0, I_k), y = w*·x + σε, ε ~ N(0, 1), loss
½ mean (w·x − y)².  With d = w − w*, the per-sample gradient g = (d·x − σε)x has mean d and
covariance Σ = (σ² + |d|²) I + d dᵀ (Isserlis), so tr Σ = k(σ² + |d|²) + |d|²; the mean
gradient over b samples has total variance tr Σ / b and SNR = |d|² b / tr Σ.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from minc_train.studies import grad_variance as GV

K, SIGMA = 10, 1.0


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(K, generator=g, dtype=torch.float64)
    d = d / d.norm()  # |d|² = 1
    c = SIGMA ** 2 + float(d @ d)
    tr = K * c + float(d @ d)
    tr_sq = K * c * c + 2 * c * float(d @ d) + float(d @ d) ** 2  # tr Σ²
    return d, tr, tr_sq


def _var_sq_norm_per_sample(d, n=2_000_000, seed=99):
    """Var(||u||²) of one centred per-sample gradient u = g − d, by Monte Carlo (2e6 samples;
    ~0.3 % relative error, which only enters the tolerances below)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, K, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, generator=gen, dtype=torch.float64)
    u = (x @ d - SIGMA * eps)[:, None] * x - d
    return float((u * u).sum(1).var())


def _sd_mean_sq_dev(d, tr_sq, b):
    """Exact SD of ||m_b − d||² for the mean m_b of b iid per-sample gradients:
    Var = [b Var(||u||²) + 2 b (b − 1) tr Σ²] / b⁴ (the cross terms u_j·u_l, j != l, are
    uncorrelated with each other and with the ||u_j||²)."""
    return math.sqrt((b * _var_sq_norm_per_sample(d) + 2 * b * (b - 1) * tr_sq) / b ** 4)


def _grad_fn(d, b, gen):
    def fn(_i):
        x = torch.randn(b, K, generator=gen, dtype=torch.float64)
        eps = torch.randn(b, generator=gen, dtype=torch.float64)
        return x.T @ (x @ d - SIGMA * eps) / b
    return fn


@pytest.mark.parametrize("b", [16, 128])
def test_matches_closed_form(b):
    d, tr, tr_sq = _toy()
    n = 1500
    gen = torch.Generator().manual_seed(100 + b)
    st = GV.gradient_noise(_grad_fn(d, b, gen), n, d, batch_size=b)  # exact ḡ = d
    var_b = tr / b
    # CLT tolerance: the estimate is a mean of n iid values of ||g_b − d||² whose exact SD is
    # known (_sd_mean_sq_dev), so its SE is SD/sqrt(n); 5 SE: a correct estimator fails with
    # probability < 1e-6.  (The sample variance adds an O(1/n) term, far inside the margin.)
    se = _sd_mean_sq_dev(d, tr_sq, b) / math.sqrt(n)
    assert abs(st["total_variance"] - var_b) < 5 * se
    assert abs(st["sample_variance"] - var_b) < 5 * se
    # ||mean − d||² has mean tr Σ/(b n) and SD ≈ sqrt(2 tr Σ²)/(b n) (CLT over b n samples);
    # bias_sq removes the mean
    assert abs(st["bias_sq"]) < 5 * math.sqrt(2 * tr_sq) / (b * n)
    # the decomposition is exact for the estimates
    assert st["total_variance"] == pytest.approx(st["sample_variance"] + st["bias_sq"], rel=1e-9)
    # the jackknife SE estimates that SE: for the mean of n iid values it is their sample SD
    # / sqrt(n), whose relative error is ~sqrt(kurtosis/4n), a few % here; 15 % is > 4 of those
    assert st["total_variance_se"] == pytest.approx(se, rel=0.15)
    # total variance x b is the per-sample trace tr Σ at every b
    assert st["total_variance_times_b"] == pytest.approx(st["total_variance"] * b, rel=1e-12)
    assert abs(st["total_variance_times_b"] - tr) < 5 * se * b
    # SNR = |d|²/(tr Σ/b): signal is exact, so its relative error is that of the variance
    snr = float(d @ d) / var_b
    assert st["signal"] == pytest.approx(float(d @ d), rel=1e-12)
    assert abs(st["snr"] / snr - 1) < 5 * se / var_b
    # forgetting ḡ (using ||g||²) would add |d|² = 1, many SEs away at both b
    assert float(d @ d) > 20 * se


def test_unbiased_for_few_draws():
    """Averaged over many repetitions with n = 3 draws: E[sample_variance] = tr Σ/b (the
    n − 1 divisor; n would give 2/3 of it), E[bias_sq] = 0, E[total_variance] = tr Σ/b."""
    d, tr, _ = _toy(1)
    b, reps = 4, 1500
    gen = torch.Generator().manual_seed(7)
    rows = [GV.gradient_noise(_grad_fn(d, b, gen), 3, d) for _ in range(reps)]
    var_b = tr / b
    for key, want in (("sample_variance", var_b), ("total_variance", var_b), ("bias_sq", 0.0)):
        v = torch.tensor([r[key] for r in rows])
        # CLT over the independent repetitions: 5 SE of their mean
        assert abs(float(v.mean()) - want) < 5 * float(v.std()) / math.sqrt(reps), key
    # the wrong divisor (n instead of n − 1) would be 1/3 of var_b off: far outside
    v = torch.tensor([r["sample_variance"] for r in rows])
    assert var_b / 3 > 10 * float(v.std()) / math.sqrt(reps)


def test_noisy_references_are_corrected():
    """ḡ from K = 2 independent batches of R samples: its own noise tr Σ/(2R) is removed from
    the total variance, and <r1, r2> estimates |d|² without the noise term."""
    d, tr, _ = _toy(2)
    b, big, reps, n = 16, 32, 400, 12
    gen = torch.Generator().manual_seed(11)
    ref_fn = _grad_fn(d, big, gen)
    mse, sig, naive = [], [], []
    for _ in range(reps):
        refs = [ref_fn(0), ref_fn(1)]
        st = GV.gradient_noise(_grad_fn(d, b, gen), n, refs, batch_size=b)
        mse.append(st["total_variance"])
        sig.append(st["signal"])
        naive.append(st["raw_mean_sq_dev"])
        assert st["ref_noise"] >= 0 and st["n_refs"] == 2
    mse, sig, naive = (torch.tensor(v) for v in (mse, sig, naive))
    var_b, noise = tr / b, tr / (2 * big)
    se = lambda v: 5 * float(v.std()) / math.sqrt(reps)  # 5 SE of a mean of iid repetitions
    assert abs(float(mse.mean()) - var_b) < se(mse)
    assert abs(float(sig.mean()) - float(d @ d)) < se(sig)
    # without the correction the estimate is var_b + noise (25 % high here): detected
    assert abs(float(naive.mean()) - (var_b + noise)) < se(naive)
    assert noise > 3 * se(mse)


def test_bias_against_an_offset_reference():
    """A reference off the true mean by δ: bias_sq = |δ|², sample variance unchanged."""
    d, tr, tr_sq = _toy(3)
    b, n = 32, 1500
    delta = torch.zeros(K, dtype=torch.float64)
    delta[0] = 0.5
    gen = torch.Generator().manual_seed(5)
    st = GV.gradient_noise(_grad_fn(d, b, gen), n, d + delta, batch_size=b)
    var_b, se = tr / b, _sd_mean_sq_dev(d, tr_sq, b) / math.sqrt(n)
    assert abs(st["sample_variance"] - var_b) < 5 * se
    # bias_sq = ||mean − d − δ||² − S²/n: SD ≈ 2|δ| sqrt(δ̂ᵀΣδ̂/(b n)) + O(1/(b n))
    sd_bias = 2 * 0.5 * math.sqrt((tr / K + 1) / (b * n)) + math.sqrt(2 * tr_sq) / (b * n)
    assert abs(st["bias_sq"] - 0.25) < 5 * sd_bias
    assert abs(st["total_variance"] - (var_b + 0.25)) < 5 * (se + sd_bias)


def test_bad_input_is_a_clear_error():
    d = torch.zeros(4)
    with pytest.raises(ValueError, match="draws"):
        GV.gradient_noise(lambda i: d, 2, d)
    with pytest.raises(TypeError, match="grad_fn"):
        GV.gradient_noise(None, 3, d)
    with pytest.raises(ValueError, match=r"ref_grads\[1\]"):
        GV.DeviationGram([torch.zeros(4), torch.zeros(5)])
    with pytest.raises(ValueError, match="g must be"):
        GV.DeviationGram(d).add(torch.zeros(3))
    with pytest.raises(ValueError, match="gram"):
        GV.noise_stats(torch.eye(2), torch.eye(1))


@pytest.mark.parametrize("argv,needle", [
    (["--draws", "2"], "--draws"),
    (["--batch-sizes", "1,8"], "--batch-sizes"),
    (["--methods", "minc,foo"], "--methods"),
    (["--batch-sizes", "8,16", "--draws", "3,3,3"], "--draws"),
    (["--ref-batch", "8", "--batch-sizes", "16"], "--ref-batch"),
])
def test_cli_rejects_bad_arguments(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        GV.resolve_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 classes x 16 grey images of 16 px (blob at a class-specific place + noise)."""
    pytest.importorskip("torchvision")
    from PIL import Image
    root = tmp_path_factory.mktemp("gv_imgs")
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"class{c}").mkdir()
        for i in range(16):
            img = (torch.rand(16, 16, generator=g) * 80).to(torch.uint8)
            img[2 + 6 * c: 8 + 6 * c, 3:13] = 230
            Image.fromarray(img.numpy()).save(root / f"class{c}" / f"{i}.png")
    return str(root)


def test_quick_cli_writes_json_table_and_plots(folder, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "gv"
    rc = GV.main(["--quick", "--dataset", "folder", "--data-dir", folder, "--image-size", "16",
                  "--threads", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(GV.METHODS)
    assert res["config"]["batch_sizes"] == [4, 8] and res["threads"] == 1 and res["wall_s"] > 0
    for m, r in res["methods"].items():
        assert [p["batch_size"] for p in r["per_batch"]] == [4, 8]
        for p in r["per_batch"]:
            assert p["n"] == 4
            for key in ("total_variance", "sample_variance", "snr", "total_variance_times_b",
                        "total_variance_se", "snr_se"):
                assert math.isfinite(p[key]), (m, key)
            assert p["sample_variance"] > 0
        assert (r["with_predictor"] is not None) == m.startswith("minc")
    assert [row["batch_size"] for row in res["paired_ratios"]] == [4, 8]
    assert set(res["paired_ratios"][0]) == {"batch_size"} | {f"{a}/{b}" for a, b in GV.PAIRS}
    for m in GV.METHODS:
        assert math.isfinite(res["flatness"][m]["alpha"])
    assert res["state"]["population_moment"]["batch_size"] == 16
    table = (out / "table.md").read_text()
    assert "SNR" in table and "| 8 |" in table
    for name in ("variance_times_b.png", "snr.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # the table and plots can be re-drawn from the JSON alone
    again = tmp_path / "again"
    assert GV.main(["--from-json", str(out / "results.json"), "--out", str(again)]) == 0
    assert (again / "table.md").read_text() == table
    assert (again / "snr.png").read_bytes()[:4] == b"\x89PNG"
