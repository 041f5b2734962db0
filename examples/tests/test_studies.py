"""Issue-8 studies: the effective-rank and collapse metrics on matrices with known answers,
the training-program options the studies use (--ordering, --minc-ablation, --lr-scaling
sqrt), and --quick smoke runs of the collapse and batch-size studies on a tiny generated
Fashion-MNIST."""
from __future__ import annotations

import inspect
import json
import math
import os

import pytest
import torch

from minc_kernels import MINCLoss
from minc_train import cli
from minc_train.engine import Trainer
from minc_train.methods import (ViewOutputs, build_loss, compute_loss, minc_no_moment_loss,
                                normalizes_features)
from minc_train.metrics import effective_rank
from minc_train.studies import batch_size, collapse

# MINCLoss's default feature map, read from its public signature
MINC_DEFAULT_FEATURE_NORM = inspect.signature(MINCLoss).parameters["feature_norm"].default


# ---------------------------------------------------------------------- metrics
def _orthonormal(n, r, seed):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


@pytest.mark.parametrize("r", [1, 3, 10])
def test_effective_rank_equal_singular_values_is_the_rank(r):
    u, v = _orthonormal(40, r, 0), _orthonormal(25, r, 1)
    x = 3.0 * u @ v.T  # r singular values equal to 3, the rest 0
    assert effective_rank(x) == pytest.approx(r, rel=1e-9)
    assert effective_rank(x.T) == pytest.approx(r, rel=1e-9)


def test_effective_rank_rank_one_and_known_spectrum():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, 1, generator=g) @ torch.randn(1, 12, generator=g)
    assert effective_rank(x) == pytest.approx(1.0, abs=1e-4)
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    x = _orthonormal(30, 4, 3) @ torch.diag(s) @ _orthonormal(9, 4, 4).T
    p = s / s.sum()
    expected = math.exp(-float((p * p.log()).sum()))  # exp(H) with p = (1/2, 1/4, 1/8, 1/8)
    assert expected == pytest.approx(2 ** 1.75)
    assert effective_rank(x) == pytest.approx(expected, rel=1e-9)
    assert effective_rank(7.5 * x) == pytest.approx(expected, rel=1e-9)  # scale-invariant


def test_normalized_std_collapsed_vs_isotropic():
    g = torch.Generator().manual_seed(0)
    d = 64
    iso = torch.randn(4000, d, generator=g)
    s = collapse.normalized_std(iso)
    assert s == pytest.approx(1 / math.sqrt(d), rel=0.03)
    st = collapse.embedding_stats(iso)
    assert st["norm_std_x_sqrt_d"] == pytest.approx(1.0, rel=0.03)
    assert st["eff_rank"] > 0.9 * d
    direction = torch.randn(1, d, generator=g, dtype=torch.float64)
    # the same direction, any norm
    collapsed = torch.rand(500, 1, generator=g, dtype=torch.float64).add(0.5) * direction
    assert collapse.normalized_std(collapsed) < 1e-6
    st = collapse.embedding_stats(collapsed)
    assert st["eff_rank"] == pytest.approx(1.0, abs=1e-6) and st["norm_std_x_sqrt_d"] < 1e-5
    # half the dimensions dead: the std drops by sqrt(2) relative to isotropic
    half = iso.clone()
    half[:, d // 2:] = 0
    assert collapse.normalized_std(half) * math.sqrt(d) == pytest.approx(1 / math.sqrt(2), rel=0.03)
    assert collapse.embedding_stats(torch.full((4, 3), float("nan")))["finite"] is False
    with pytest.raises(ValueError, match="z must be"):
        collapse.normalized_std(torch.zeros(1, 3))


# ---------------------------------------------------------------------- tiny Fashion-MNIST
# (the fmnist fixture: conftest.py)
def tiny(fmnist, out, *extra):
    return ["--data-dir", fmnist, "--no-download", "--width", "4", "--pool", "1", "--batch-size", "16",
            "--epochs", "1", "--epoch-size", "32", "--proj-hidden", "16", "--proj-dim", "8",
            "--pred-hidden", "16", "--threads", "1", "--no-progress", "--eval-every", "0",
            "--out-dir", str(out), *extra]


# ---------------------------------------------------------------------- training-program options
def _one_step(fmnist, tmp_path, *extra):
    # --amp none: the checks below compare with fp32 arithmetic, whatever --amp auto picks
    tr = Trainer(cli.resolve_config(tiny(fmnist, tmp_path, "--method", "minc", "--seed", "3",
                                         "--amp", "none", *extra)))
    tr.train_mode()
    x1, x2 = next(tr.batches(0))
    return tr, x1, x2


def test_gha_ordering_reaches_minc_loss(fmnist, tmp_path):
    std, x1, x2 = _one_step(fmnist, tmp_path / "a")
    gha, y1, y2 = _one_step(fmnist, tmp_path / "b", "--ordering", "gha")
    assert std.loss_fn.ordering == "standard" and gha.loss_fn.ordering == "gha"
    assert torch.equal(x1, y1)
    # two steps: the first fills M, the second's gradient uses it (LT(M) vs M)
    for _ in range(2):
        std.train_step(x1, x2)
        gha.train_step(x1, x2)
    w = "encoder.projector.0.weight"
    assert not torch.allclose(std.model.state_dict()[w], gha.model.state_dict()[w])


def test_no_moment_ablation_loss_is_the_cross_term(fmnist, tmp_path):
    tr, x1, x2 = _one_step(fmnist, tmp_path, "--minc-ablation", "no-moment")
    with torch.no_grad():
        _, p1 = tr.model(x1)
        _, p2 = tr.model(x2)
        t1, t2 = tr.target(x1), tr.target(x2)
    expected = -2 * ((p1 * t2).sum(1).mean() + (p2 * t1).sum(1).mean())
    loss = tr.train_step(x1, x2)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert int(tr.loss_fn.num_updates) == 0  # M is neither used nor updated
    # the function's gradient wrt p is -(2/B) t, and t gets none
    p, t = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    minc_no_moment_loss(p, t).backward()
    assert torch.allclose(p.grad, -2 / 5 * t.detach()) and t.grad is None
    with pytest.raises(ValueError, match="same shape"):
        minc_no_moment_loss(torch.zeros(4, 3), torch.zeros(4, 2))

def _views(k=6, b=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    p1, p2, t1, t2 = (scale * torch.randn(b, k, generator=g, dtype=torch.float64) for _ in range(4))
    return ViewOutputs(None, None, p1.requires_grad_(), p2.requires_grad_(), t1, t2)


def _loss_and_grads(loss_fn, out, normalize, ablation="none"):
    loss = compute_loss("minc", loss_fn, out, normalize, ablation)
    return (loss.detach(), *torch.autograd.grad(loss, (out.p1, out.p2)))


def test_normalize_is_not_applied_twice_on_the_default_minc_loss():
    """--normalize on top of MINCLoss(feature_norm="l2") (the library default) would
    normalise unit rows a second time: compute_loss skips that, so the step is exactly the
    one without the flag; the flag still acts on the no-moment ablation and on raw losses."""
    out = _views()
    default = build_loss("minc", 6)
    assert normalizes_features(default) and default.feature_norm == MINC_DEFAULT_FEATURE_NORM
    plain = _loss_and_grads(build_loss("minc", 6), out, False)
    flagged = _loss_and_grads(default, out, True)
    for a, b in zip(plain, flagged):
        assert torch.equal(a, b)  # bitwise: not normalised a second time
    # normalising first by hand gives the same step up to rounding only
    unit = ViewOutputs(None, None, *(torch.nn.functional.normalize(v, dim=1)
                                     for v in (out.p1, out.p2, out.t1, out.t2)))
    twice = compute_loss("minc", build_loss("minc", 6), unit).detach()
    assert torch.allclose(twice, plain[0], rtol=1e-12, atol=0)
    # where the loss does not normalise, the flag changes the loss
    raw = MINCLoss(6, feature_norm="none")
    assert not normalizes_features(raw)
    assert not torch.allclose(_loss_and_grads(raw, out, True)[0],
                              _loss_and_grads(MINCLoss(6, feature_norm="none"), out, False)[0])
    abl_plain = _loss_and_grads(default, out, False, "no-moment")[0]
    abl_norm = _loss_and_grads(default, out, True, "no-moment")[0]
    unit_cross = -2 * ((torch.nn.functional.normalize(out.p1, dim=1)
                        * torch.nn.functional.normalize(out.t2, dim=1)).sum(1).mean()
                       + (torch.nn.functional.normalize(out.p2, dim=1)
                          * torch.nn.functional.normalize(out.t1, dim=1)).sum(1).mean())
    # the ablation's value is float32 (minc_no_moment_loss computes in float32)
    assert torch.allclose(abl_norm, unit_cross.detach().float()) and not torch.allclose(abl_plain, abl_norm)


def test_sqrt_lr_scaling(fmnist, tmp_path):
    tr = Trainer(cli.resolve_config(tiny(fmnist, tmp_path, "--lr", "0.01", "--lr-scaling", "sqrt",
                                         "--batch-size", "64", "--epoch-size", "64")))
    assert tr.base_lr == pytest.approx(0.01 * math.sqrt(64 / 256))


@pytest.mark.parametrize("argv,needle", [
    (["--ordering", "random"], "--ordering"),
    (["--minc-ablation", "no-covariance"], "--minc-ablation"),
    (["--method", "spectral", "--ordering", "gha"], "--ordering"),
    (["--method", "mio", "--minc-ablation", "no-moment"], "--minc-ablation"),
    (["--minc-ablation", "no-moment", "--ordering", "gha"], "--ordering gha has no effect"),
    (["--lr-scaling", "cubic"], "--lr-scaling"),
])
def test_bad_study_options(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.resolve_config(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_resume_keeps_the_loss_options(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    cli.run(tiny(fmnist, out, "--method", "minc", "--ordering", "gha", "--no-probe"))
    cfg = cli.resolve_config(["--resume", str(out), "--epochs", "2"])
    assert cfg.ordering == "gha" and cfg.minc_ablation == "none"
    with pytest.raises(SystemExit):
        cli.resolve_config(["--resume", str(out), "--ordering", "standard"])
    assert "--ordering" in capsys.readouterr().err


# ---------------------------------------------------------------------- study smoke runs
def test_collapse_quick_writes_json_and_png(fmnist, tmp_path):
    out = tmp_path / "out"
    assert collapse.main(["--quick", "--data-dir", fmnist, "--out", str(out), "--work-dir",
                          str(tmp_path / "work"), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"minc", "spectral", "minc-no-moment"}
    for r in res["methods"].values():
        steps = [q["step"] for q in r["records"]]
        assert steps == [0, 2, 4]
        last = r["records"][-1]
        assert 1.0 <= last["proj"]["eff_rank"] <= last["proj"]["dim"]
        assert last["backbone"]["dim"] == r["feat_dim"] and math.isfinite(last["loss"])
    assert (out / "collapse.png").stat().st_size > 5000
    assert "MINC without M" in (out / "table.md").read_text()
    (out / "collapse.png").unlink()
    assert collapse.main(["--replot", "--out", str(out)]) == 0 and (out / "collapse.png").is_file()
    with pytest.raises(SystemExit):
        collapse.main(["--methods", "minc,byol"])


def test_batch_size_quick_is_resumable(fmnist, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--quick", "--data-dir", fmnist, "--batch-sizes", "8,16", "--methods", "spectral,minc-gha,mio",
            "--seeds", "2", "--out", str(out), "--work-dir", str(work), "--no-progress"]
    assert batch_size.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["runs_done"] == res["meta"]["runs_planned"] == 12
    cell = res["summary"]["methods"]["minc-gha"]["16"]
    assert cell["n"] == 2 and 0 <= cell["mean"] <= 100
    assert {r["images_seen"] for r in res["runs"]} == {32}  # fixed budget at both batch sizes
    gha = next(r for r in res["runs"] if r["method"] == "minc-gha")
    assert "--ordering" in gha["argv"] and "gha" in gha["argv"]
    assert res["summary"]["baselines"]["raw_pixels"]["n"] == 2
    assert (out / "accuracy_vs_batch.png").stat().st_size > 5000
    assert "MINC (GHA ordering)" in (out / "table.md").read_text()
    # a restart skips finished runs: nothing is retrained, the per-run files are untouched
    one = out / "runs" / "mio-b8-s1.json"
    before = one.stat().st_mtime_ns
    capsys.readouterr()
    assert batch_size.main(argv) == 0
    assert one.stat().st_mtime_ns == before
    assert "epoch=" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        batch_size.main(["--batch-sizes", "64,abc"])


def test_gpu_budgets_resolve_to_valid_configs(tmp_path):
    """The GPU presets are not run here, but each run's options must form a valid config."""
    a = batch_size.parse_args(["--budget", "gpu", "--device", "cpu"])
    for m in a.method_list:
        cfg = cli.resolve_config(batch_size.train_argv(a, m, 1024, 0, str(tmp_path / m)))
        assert cfg.arch == "resnet18" and cfg.preset == "gpu" and cfg.epochs == 50
        assert cfg.ordering == ("gha" if m == "minc-gha" else "standard")
    a = collapse.parse_args(["--budget", "gpu", "--methods", ",".join(collapse.METHODS)])
    for m in a.method_list:
        cfg = cli.resolve_config(collapse.train_argv(a, m, str(tmp_path / m)))
        assert cfg.arch == "resnet18" and cfg.epoch_size == 512 * 117
        if m.startswith("minc-no-moment"):  # the raw control stays raw under the GPU preset
            assert cfg.normalize is (m == "minc-no-moment-normalized"), (m, cfg.normalize)
    assert cfg.minc_ablation == "no-moment"


def test_study_results_default_to_examples_results():
    """Study outputs live with the application (examples/results/studies/<study>/), not in the
    library's benchmarks/ tree."""
    from minc_train.studies import grad_variance, minc_variants
    from minc_train.studies._common import EXAMPLES
    assert os.path.isfile(os.path.join(EXAMPLES, "pyproject.toml"))  # examples/, the app's root
    for study in (batch_size, collapse, grad_variance, minc_variants):
        out = os.path.relpath(study.DEFAULT_OUT, EXAMPLES)
        assert out.split(os.sep)[:2] == ["results", "studies"], (study.__name__, out)
