"""The reference training program (minc_train): smoke runs of every method on a
tiny generated image folder, exact resume, 2-process DDP (gloo), argument errors, and
the metrics/optimiser/augmentation building blocks."""
from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402  (torchvision depends on Pillow)

from minc_train import cli, data as D  # noqa: E402
from minc_train.metrics import effective_rank, knn_accuracy, linear_probe  # noqa: E402
from minc_train.optim import LARS, param_groups, warmup_cosine  # noqa: E402

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # examples/


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 12 RGB images of 20 px: a bright blob at a class-specific place + noise."""
    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        d = root / f"class{c}"
        d.mkdir()
        for i in range(12):
            img = (torch.rand(20, 20, 3, generator=g) * 80).to(torch.uint8)
            img[2 + 5 * c: 8 + 5 * c, 4:16, c] = 230
            Image.fromarray(img.numpy()).save(d / f"{i}.png")
    return str(root)


def tiny_args(folder, out, *extra):
    return ["--dataset", "folder", "--data-dir", folder, "--loader", "memory", "--image-size", "16",
            "--arch", "convnet", "--width", "4", "--pool", "1", "--batch-size", "8",
            "--epochs", "1", "--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "16",
            "--knn-k", "5", "--probe-iters", "5", "--threads", "1", "--no-progress",
            "--ema-backend", "foreach", "--out-dir", str(out), *extra]


@pytest.mark.parametrize("method,extra", [
    ("minc", ["--optimizer", "lars", "--lr", "0.2", "--augment", "byol"]),
    ("spectral", ["--optimizer", "sgd", "--lr", "0.05", "--arch", "resnet18", "--stem", "s2"]),
    ("mio", ["--optimizer", "adamw", "--lr", "1e-3", "--loader", "stream", "--augment", "weak",
             "--raw-probe"]),
    ("barlow", ["--optimizer", "adamw", "--lr", "1e-3"]),
    ("vicreg", ["--optimizer", "lars", "--lr", "0.2", "--augment", "byol"]),
])
def test_smoke_every_method(folder, tmp_path, method, extra):
    out = tmp_path / "run"
    rep = cli.run(tiny_args(folder, out, "--method", method, "--epochs", "2", *extra))
    assert len(rep["history"]) == 2
    for row in rep["history"]:
        assert math.isfinite(row["loss"])
        assert 0.0 <= row["knn_acc"] <= 100.0
        assert row["eff_rank"] >= 1.0
    probes = rep["probes"]
    for name in ("ssl", "random_init", "raw_pixels"):
        assert 0.0 <= probes[name]["test_acc"] <= 100.0, name
    for f in ("log.csv", "checkpoint.pt", "report.json", "report.txt", "loss.png", "knn_acc.png",
              "eff_rank.png"):
        assert (out / f).is_file(), f
    with open(out / "log.csv") as fh:
        assert len(fh.read().strip().splitlines()) == 3  # header + 2 epochs
    # the checkpoint loads with weights_only=True
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == rep["history"][-1]["step"]
    if method == "minc":
        assert ck["loss"]["num_updates"].item() == ck["step"]
        assert ck["target"]


def _state(path):
    ck = torch.load(path, weights_only=True)
    return ck


def test_resume_is_exact(folder, tmp_path):
    args = ["--method", "minc", "--epochs", "2", "--no-probe", "--optimizer", "lars", "--lr", "0.1"]
    cli.run(tiny_args(folder, tmp_path / "a", *args))
    cli.run(tiny_args(folder, tmp_path / "b", *args, "--stop-after", "1"))
    half = _state(tmp_path / "b" / "checkpoint.pt")
    assert half["epoch"] == 0
    cli.run(["--resume", str(tmp_path / "b"), "--no-progress", "--no-probe"])
    a, b = _state(tmp_path / "a" / "checkpoint.pt"), _state(tmp_path / "b" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"]
    for part in ("model", "target", "loss"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys() and "momentum_buffer" in sa[k]
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name]))
    # and the state did change during the second epoch
    assert not torch.equal(half["model"]["encoder.backbone.features.0.weight"],
                           b["model"]["encoder.backbone.features.0.weight"])
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


def test_ddp_two_processes_gloo(folder, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(EXAMPLES, "train.py"),
           *tiny_args(folder, out, "--method", "minc", "--device", "cpu", "--probe-iters", "3")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["history"][-1]["step"] == 4  # (36 - 4 held out) images // global batch 8 (2 x 4)
    assert rep["config"]["batch_size"] == 8
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["loss"]["num_updates"].item() == 4


@pytest.mark.parametrize("argv,needle", [
    (["--method", "byol"], "--method"),
    (["--dataset", "folder"], "--data-dir"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/dir"], "--data-dir"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--batch-size", "0"], "--batch-size"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume"),
])
def test_bad_arguments(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.run(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.run(tiny_args(str(tmp_path), tmp_path / "o"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # one line naming the option, no usage text, and no run directory left behind
    assert "--data-dir" in err and "usage:" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["--dataset", "folder"],
    ["--dataset", "folder", "--data-dir", "/nonexistent/dir"],
    ["--batch-size", "0"],
])
def test_value_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.run(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage:" not in err and len(err.strip().splitlines()) == 1


def test_help_shows_every_option_with_its_default():
    parser = cli.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 40
    for a in options:
        assert a.help and "(default: " in a.help, a.option_strings
    text = parser.format_help()
    assert "auto: s1 below 96 px" in text  # --stem auto is documented
    gpu_lr = {m: cli.METHOD_DEFAULTS["gpu"][m]["lr"]
              for m in ("minc", "spectral", "mio", "barlow", "vicreg")}
    assert (f"gpu preset: minc {gpu_lr['minc']}, spectral {gpu_lr['spectral']}, mio "
            f"{gpu_lr['mio']}, barlow {gpu_lr['barlow']}, vicreg {gpu_lr['vicreg']})"
            ) in " ".join(text.split())  # --lr: per preset and method


def test_unreadable_image_is_named_and_skipped(folder, tmp_path, capfd):
    import shutil
    root = tmp_path / "imgs"
    shutil.copytree(folder, root)
    good = (root / "class0" / "0.png").read_bytes()
    (root / "class1" / "bad.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    for loader, workers in (("stream", "1"), ("memory", "0")):
        out = tmp_path / loader
        # the kNN evaluation reads every image, so the bad one is met whatever the split
        rep = cli.run(tiny_args(str(root), out, "--method", "mio", "--loader", loader,
                                "--workers", workers, "--no-probe", "--eval-every", "1",
                                "--epochs", "2"))
        err = capfd.readouterr().err  # capfd: the stream loader's worker process writes it
        assert "skipping unreadable image" in err and "bad.png" in err, loader
        if loader == "stream":  # the epoch rows count what was skipped (also in workers)
            assert rep["history"][-1]["unreadable_images_skipped"] >= 1
        else:
            assert "skipped 1 unreadable image(s) of 37" in err


def test_resume_keeps_flags_and_reports_environment(folder, tmp_path, capsys):
    out = tmp_path / "g"
    args = ["--method", "spectral", "--grayscale", "--epochs", "2", "--probe-iters", "3",
            "--amp", "none"]
    cli.run(tiny_args(folder, out, *args, "--stop-after", "1", "--no-probe"))
    stdout = capsys.readouterr().out
    assert ", fp32, device cpu" in stdout and "ema_momentum" not in stdout  # spectral: no EMA
    rep = cli.run(["--resume", str(out), "--no-progress"])
    assert rep["config"]["grayscale"] is True  # a store_true flag survives --resume
    assert rep["history"][-1]["epoch"] == 2
    env = rep["environment"]
    import minc_kernels
    assert env["torch"] == torch.__version__ and env["minc_kernels"] == minc_kernels.__version__
    assert env["device"] == "cpu" and env["precision"] == "fp32"
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    saved = json.loads((out / "report.json").read_text())
    assert saved["environment"] == env
    capsys.readouterr()
    # resuming the finished run says so and leaves its report alone
    before = (out / "report.json").read_bytes()
    again = cli.run(["--resume", str(out), "--no-progress"])
    assert "has finished its 2 epochs" in capsys.readouterr().out
    assert (out / "report.json").read_bytes() == before and again["history"] == rep["history"]
    # a larger --epochs continues it and says that the schedules change at the join
    longer = cli.run(["--resume", str(out), "--no-progress", "--epochs", "3", "--no-probe"])
    err = capsys.readouterr().err
    assert "--epochs 3 differs from the checkpoint's 2" in err and "the lr goes from" in err
    assert longer["history"][-1]["epoch"] == 3 and any("--epochs 3" in n for n in longer["notes"])


def test_start_warnings_long_warmup_and_single_class(tmp_path, capsys):
    root = tmp_path / "one"
    (root / "only").mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for i in range(20):
        img = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8)
        Image.fromarray(img.numpy()).save(root / "only" / f"{i}.png")
    rep = cli.run(tiny_args(str(root), tmp_path / "o", "--warmup-epochs", "3", "--no-probe",
                            "--eval-every", "0"))
    err = capsys.readouterr().err
    assert "the lr never reaches its base value" in err
    assert "single class" in err
    assert len(rep["notes"]) == 2


# ---------------------------------------------------------------------- building blocks
def test_effective_rank():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-6)
    x = torch.randn(50, 1) @ torch.randn(1, 9)
    assert effective_rank(x) == pytest.approx(1.0, abs=1e-3)
    # exp(entropy) of singular values (3, 1): p = (.75, .25)
    v = torch.diag(torch.tensor([3.0, 1.0]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(v) == pytest.approx(math.exp(h), rel=1e-6)
    assert effective_rank(torch.zeros(4, 3)) == 0.0
    with pytest.raises(ValueError, match="features"):
        effective_rank(torch.zeros(3))


def test_knn_and_probe_separate_easy_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=g)
    assert knn_accuracy(x[:300], y[:300], x[300:], y[300:], k=10) > 95
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], max_iter=50)["test_acc"] > 95
    # random labels: near chance
    yr = torch.randint(0, 4, (400,), generator=g)
    assert knn_accuracy(x[:300], yr[:300], x[300:], yr[300:], k=10) < 50


def test_lars_excludes_bias_and_bn_and_schedule():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    groups = param_groups(net, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]
    opt = LARS(groups, lr=1.0, momentum=0.0, trust_coefficient=0.01)
    w0, b0 = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    net[0].weight.grad = torch.ones_like(w0)
    net[0].bias.grad = torch.ones_like(b0)
    opt.step()
    d = w0 + 0.1 * w0 * 0  # wd applies to the weight: update = trust * (g + wd w)
    gw = torch.ones_like(w0) + 0.1 * w0
    trust = 0.01 * w0.norm() / gw.norm()
    assert torch.allclose(net[0].weight, d - trust * gw, atol=1e-6)
    assert torch.allclose(net[0].bias, b0 - 1.0)  # excluded: plain SGD, no adaptation
    assert warmup_cosine(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_lars_matches_timm_where_the_conventions_agree():
    """Our LARS follows BYOL/SimCLR (trust ratio eta |w| / |g + wd w|); timm's Lars follows
    apex (eta |w| / (|g| + wd |w|)).  Without weight decay the two are the same update."""
    timm_optim = pytest.importorskip("timm.optim")
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 4, generator=g)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = LARS([{"params": [a], "weight_decay": 0.0, "lars_exclude": False}], lr=0.1,
                momentum=0.9, trust_coefficient=0.01)
    theirs = timm_optim.Lars([b], lr=0.1, momentum=0.9, trust_coeff=0.01, always_adapt=True)
    for _ in range(4):
        grad = torch.randn(5, 4, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert not torch.equal(a, w0)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_batch_augment_reproducible_and_shaped():
    x = (torch.rand(6, 3, 24, 24) * 255).to(torch.uint8)
    v1, v2 = D.view_configs("byol", 40, 3)
    assert v1.blur_p == 1.0 and v2.solarize_p == 0.2
    aug = D.BatchAugment(v1, 20, D.IMAGENET_MEAN, D.IMAGENET_STD)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 20, 20) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # identity-like view: full crop, no flip/jitter -> the normalised image itself
    ident = D.BatchAugment(D.ViewConfig(scale=(1, 1), ratio=(1, 1), flip=0, jitter_p=0, grey_p=0),
                           24, (0.0,) * 3, (1.0,) * 3)
    assert torch.allclose(ident(x, torch.Generator()), x.float() / 255, atol=1e-5)


def test_fashion_mnist_idx_reader(tmp_path):
    imgs = (torch.arange(2 * 28 * 28) % 256).to(torch.uint8).view(2, 28, 28)
    for split, (fi, fl) in D.FASHION_MNIST_FILES.items():
        with gzip.open(tmp_path / fi, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                    + imgs.numpy().tobytes())
        with gzip.open(tmp_path / fl, "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([3, 7]))
    train, test = D.load_fashion_mnist(str(tmp_path), download=False)
    assert train.images.shape == (2, 1, 28, 28) and torch.equal(train.images[:, 0], imgs)
    assert train.labels.tolist() == [3, 7]


def test_train_step_benchmark_writes_json(tmp_path):
    from minc_train import bench_step
    assert bench_step.main(["--out", str(tmp_path), "--device", "cpu", "--methods", "minc,mio",
                            "--steps", "1", "--warmup", "0", "--batch", "8", "--threads", "1"]) == 0
    res = json.loads((tmp_path / "train_step.json").read_text())["results"]
    for m in ("minc", "mio"):
        for prov in ("eager", "minc_kernels"):
            r = res[m][prov]
            assert r["step_ms"] > 0 and 0 <= r["loss_share"] and r["steps_timed"] == 1
    assert res["minc"]["eager"]["ema_ms"] > 0 and res["mio"]["eager"]["ema_ms"] == 0


def test_step_ab_benchmark_runs_every_variant(fmnist, capsys):
    from minc_train import bench_step_ab
    assert bench_step_ab.main(["--data-dir", fmnist, "--batch-size", "16", "--rounds", "1",
                               "--steps", "1"]) == 0
    out = capsys.readouterr().out
    for v in bench_step_ab.VARIANTS:
        assert f"\n{v} " in out, v
    with pytest.raises(SystemExit):
        bench_step_ab.main(["--variants", "fp16-cl"])
