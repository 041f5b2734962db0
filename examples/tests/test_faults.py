"""Fault injection on the training program (issue 25): run folders are never replaced by
accident, checkpoints survive a kill or a full disk during their write, damaged or foreign
checkpoints are refused with one line naming the file, resume checks the options against the
checkpoint's, and the report says how to go on and what was used.

Tiny runs on a generated Fashion-MNIST (conftest.py: 96 training images, 2 steps of 16 per
epoch, a 4-channel conv net): each test takes seconds."""
from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from minc_train import checkpoint as C
from minc_train import cli


def tiny(fmnist, out, *extra):
    return ["--data-dir", fmnist, "--no-download", "--width", "4", "--pool", "1", "--batch-size", "16",
            "--epochs", "2", "--epoch-size", "32", "--proj-hidden", "16", "--proj-dim", "8",
            "--pred-hidden", "16", "--threads", "1", "--no-progress", "--eval-every", "0",
            "--no-probe", "--amp", "none", "--ema-backend", "foreach", "--out-dir", str(out), *extra]


def fails(argv, capsys, code=2) -> str:
    """Run the program expecting exit status ``code``; returns stderr, checked to be one line
    with no traceback."""
    with pytest.raises(SystemExit) as exc:
        cli.run(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("minc-train: error:")]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


def log_epochs(out) -> list[int]:
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,")
    return [int(r.split(",")[0]) for r in rows[1:]]


@pytest.fixture(scope="module")
def done_run(fmnist, tmp_path_factory):
    """A finished 2-epoch run whose files the tests copy or read (never change)."""
    out = tmp_path_factory.mktemp("done") / "run"
    cli.run(tiny(fmnist, out))
    return out


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------- run folders
def test_new_run_refuses_a_folder_that_holds_a_run(fmnist, done_run, tmp_path, capsys):
    out = copy_run(done_run, tmp_path / "r")
    before = {f: (out / f).read_bytes() for f in ("checkpoint.pt", "log.csv", "report.json")}
    err = fails(tiny(fmnist, out, "--lr", "1e-3"), capsys)
    assert "already holds a run" in err and "--overwrite" in err and f"--resume {out}" in err
    assert {f: (out / f).read_bytes() for f in before} == before  # nothing touched


def test_overwrite_replaces_the_run(fmnist, done_run, tmp_path, capsys):
    out = copy_run(done_run, tmp_path / "r")
    (out / "notes.txt").write_text("mine")  # not the program's: kept
    rep = cli.run(tiny(fmnist, out, "--epochs", "1", "--overwrite"))
    assert "deleted the previous run's" in capsys.readouterr().out
    assert log_epochs(out) == [1] and len(rep["history"]) == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert C.read(str(out / "checkpoint.pt"))["config"]["epochs"] == 1


def test_resume_into_another_folder_that_holds_a_run(fmnist, done_run, tmp_path, capsys):
    a = copy_run(done_run, tmp_path / "a")
    b = copy_run(done_run, tmp_path / "b")
    err = fails(["--resume", str(a), "--out-dir", str(b), "--epochs", "3"], capsys)
    assert "already holds a run" in err
    err = fails(["--resume", str(a), "--overwrite"], capsys)
    assert "--overwrite with --resume would delete the run" in err


def test_out_dir_that_is_a_file_or_under_a_file(fmnist, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file, not a folder" in fails(tiny(fmnist, f), capsys)
    assert "is a file, not a folder" in fails(tiny(fmnist, f / "sub"), capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only modes (the fake case covers it)")
def test_read_only_folder(fmnist, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = fails(tiny(fmnist, ro / "run"), capsys)
    finally:
        ro.chmod(0o755)
    assert "cannot write in" in err and not (ro / "run").exists()


def test_read_only_file_system_fake(fmnist, tmp_path, capsys, monkeypatch):
    import tempfile

    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", erofs)
    err = fails(tiny(fmnist, tmp_path / "run"), capsys)
    assert "cannot write in" in err and "Read-only file system" in err
    assert not (tmp_path / "run").exists()


def test_auto_named_folders_do_not_collide(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20260101-000000")
    first = cli.resolve_config(["--method", "mio"]).out_dir
    os.makedirs(first)
    second = cli.resolve_config(["--method", "mio"]).out_dir
    assert first == os.path.join("runs", "mio-fashion-mnist-20260101-000000")
    assert second == first + "-2"


# ---------------------------------------------------------------------- damaged checkpoints
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def _damage(kind: str, path, tmp_path):
    data = path.read_bytes()
    ck = torch.load(path, weights_only=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(len(data)))
    elif kind == "foreign-state-dict":  # someone's plain model weights
        torch.save({"weight": torch.zeros(3, 3)}, path)
    elif kind == "foreign-list":
        torch.save([1, 2, 3], path)
    elif kind == "pickle-payload":
        with open(path, "wb") as f:  # protocol 2, what torch.save writes: reaches the global
            pickle.dump({"model": _Evil()}, f, protocol=2)
    elif kind == "edited-weights":  # a finite change, the file itself well-formed
        k = next(iter(ck["model"]))
        ck["model"][k] = ck["model"][k] + 1e-3
        torch.save(ck, path)
    elif kind == "bytes-4k":  # 4 KB of finite float32 values written over the largest tensor
        big = max((v for part in ("model", "target") for v in ck[part].values() if v.dim() == 2),
                  key=torch.Tensor.numel)  # a Linear weight (conv weights are channels_last)
        raw = big.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        at = data.find(raw[:256])
        assert at > 0
        n = min(4096, len(raw)) // 4 * 4
        noise = (torch.rand(n // 4, generator=torch.Generator().manual_seed(0)) - 0.5).numpy().tobytes()
        path.write_bytes(data[:at] + noise + data[at + n:])
    elif kind == "nan-weights":  # a valid digest over NaN weights (a diverged run's checkpoint)
        k = next(k for k, v in ck["model"].items() if v.is_floating_point())
        ck["model"][k] = torch.full_like(ck["model"][k], float("nan"))
        for own in ("format", "format_version", "sha256"):
            ck.pop(own)
        C.save(ck, str(path))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind,needle", [
    ("empty", "empty"), ("truncated", "unreadable"), ("random", "unreadable"),
    ("foreign-state-dict", "not a minc-train checkpoint"), ("foreign-list", "not a minc-train checkpoint"),
    ("pickle-payload", "refused"), ("edited-weights", "corrupted"), ("bytes-4k", "corrupted"),
    ("nan-weights", "NaN/Inf"),
])
def test_damaged_checkpoint_is_one_line_naming_the_file(kind, needle, done_run, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = copy_run(done_run, tmp_path / "r")
    ck = out / "checkpoint.pt"
    _damage(kind, ck, tmp_path)
    err = fails(["--resume", str(out), "--epochs", "3"], capsys)
    assert needle in err and str(ck) in err, err
    assert not (tmp_path / "EVIL_RAN").exists()
    # the library-level reader says the same
    with pytest.raises(C.CheckpointError, match=needle):
        C.read(str(ck))


def test_checkpoint_that_does_not_fit_the_model(done_run, tmp_path, capsys):
    out = copy_run(done_run, tmp_path / "r")
    ck = C.read(str(out / "checkpoint.pt"))
    ck["config"]["proj_dim"] = 16  # its weights are for 8
    for own in ("format", "format_version", "sha256", "verified"):
        ck.pop(own)
    C.save(ck, str(out / "checkpoint.pt"))
    err = fails(["--resume", str(out), "--epochs", "3"], capsys)
    assert "does not fit this run" in err and "checkpoint.pt" in err


def test_digest_covers_every_tensor_and_value(done_run):
    ck = C.read(str(done_run / "checkpoint.pt"))
    payload = {k: v for k, v in ck.items() if k not in ("format", "format_version", "sha256", "verified")}
    d = C.payload_digest(payload)
    assert d == ck["sha256"]
    payload["rng"]["python"]["gauss"] = 0.5 if payload["rng"]["python"]["gauss"] != 0.5 else 0.25
    assert C.payload_digest(payload) != d
    payload = {k: v for k, v in ck.items() if k not in ("format", "format_version", "sha256", "verified")}
    payload["step"] += 1
    assert C.payload_digest(payload) != d
    t = torch.zeros(4)
    assert C.payload_digest({"a": t}) != C.payload_digest({"a": t.to(torch.float64)})  # dtype
    assert C.payload_digest({"a": t}) != C.payload_digest({"a": t.view(2, 2)})  # shape
    assert C.payload_digest({"a": 1}) != C.payload_digest({"a": 1.0}) != C.payload_digest({"a": True})


# ---------------------------------------------------------------------- kill and full disk
_KILL_ON_SECOND_WRITE = textwrap.dedent("""
    import os, signal, sys
    from minc_train import checkpoint as C, cli
    real, calls = C._write_bytes, []
    def dying(data, tmp):
        calls.append(tmp)
        if len(calls) == 2:  # epoch 2's checkpoint: half written, then kill -9
            with open(tmp, "wb") as f:
                f.write(bytes(data)[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(data, tmp)
    C._write_bytes = dying
    cli.main(sys.argv[1:])
""")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_kill_during_checkpoint_write_then_resume(fmnist, tmp_path, capsys):
    out = tmp_path / "r"
    args = tiny(fmnist, out, "--epochs", "3")
    res = subprocess.run([sys.executable, "-c", _KILL_ON_SECOND_WRITE, *args], env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    ck = C.read(str(out / "checkpoint.pt"))  # the previous one, intact and verified
    assert ck["epoch"] == 0 and ck["verified"]
    assert [p.name for p in out.glob("checkpoint.pt.*.tmp")]  # the partial file of the killed write
    assert log_epochs(out) == [1, 2]  # epoch 2 was logged, never checkpointed
    rep = cli.run(["--resume", str(out)])
    err = capsys.readouterr().err
    assert "removed 1 partial file(s) left by an interrupted run" in err
    assert not list(out.glob("*.tmp"))
    assert log_epochs(out) == [1, 2, 3]  # no duplicate row for epoch 2
    assert [r["epoch"] for r in rep["history"]] == [1, 2, 3]
    # and the resumed run is the uninterrupted one, bit for bit
    ref = cli.run(tiny(fmnist, tmp_path / "ref", "--epochs", "3"))
    assert [r["loss"] for r in ref["history"]] == [r["loss"] for r in rep["history"]]
    a, b = C.read(str(out / "checkpoint.pt")), C.read(str(tmp_path / "ref" / "checkpoint.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_stale_tmp_of_a_live_process_is_kept(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, os.getppid(), os.getpid()):
        open(f"{path}.{pid}.tmp", "w").close()
    removed = sorted(os.path.basename(p) for p in C.remove_stale_tmp(path))
    assert removed == sorted([f"checkpoint.pt.{dead.pid}.tmp", f"checkpoint.pt.{os.getpid()}.tmp"])
    assert os.path.exists(f"{path}.{os.getppid()}.tmp")


def test_full_disk_via_file_size_limit(fmnist, tmp_path):
    out = tmp_path / "r"
    cli.run(tiny(fmnist, out, "--stop-after", "1"))
    before = (out / "checkpoint.pt").read_bytes()
    limit = len(before) // 2  # the log and config fit, the checkpoint does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    res = subprocess.run([sys.executable, "-m", "minc_train.cli", "--resume", str(out)], env=_env(),
                         capture_output=True, text=True, timeout=240, preexec_fn=small_files)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("minc-train: error: could not write the checkpoint") and "File too large" in last
    assert "the previous checkpoint is kept" in last and f"--resume {out}" in last
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob("*.tmp"))


def test_full_disk_fake_writer(fmnist, done_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    cli.run(tiny(fmnist, out, "--stop-after", "1"))
    capsys.readouterr()
    before = (out / "checkpoint.pt").read_bytes()

    def full(data, tmp):
        with open(tmp, "wb") as f:
            f.write(bytes(data)[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
    monkeypatch.setattr(C, "_write_bytes", full)
    err = fails(["--resume", str(out)], capsys, code=1)
    assert "No space left on device" in err and "the previous checkpoint is kept" in err
    assert (out / "checkpoint.pt").read_bytes() == before and not list(out.glob("*.tmp"))
    # a new run whose first checkpoint cannot be written leaves no folder behind
    with pytest.raises(SystemExit):
        cli.run(tiny(fmnist, tmp_path / "new"))
    err = capsys.readouterr().err
    assert "No space left on device" in err and "no checkpoint was written" in err
    assert not (tmp_path / "new").exists()


def test_full_disk_on_the_log(fmnist, tmp_path, capsys, monkeypatch):
    from minc_train import metrics

    def full(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
    monkeypatch.setattr(metrics.CSVLogger, "log", full)
    err = fails(tiny(fmnist, tmp_path / "r"), capsys, code=1)
    assert f"cannot write {tmp_path / 'r' / 'log.csv'}" in err and "No space left" in err


# ---------------------------------------------------------------------- resume options
@pytest.mark.parametrize("extra,needle", [
    (["--optimizer", "sgd"], "--optimizer 'sgd' differs from the checkpoint's 'adamw'"),
    (["--optimizer", "lars"], "--optimizer 'lars'"),
    (["--proj-dim", "16"], "--proj-dim 16 differs"),
    (["--width", "8"], "--width 8 differs"),
    (["--arch", "resnet18"], "--arch 'resnet18' differs"),
    (["--dataset", "folder", "--data-dir", "."], "--dataset 'folder' differs"),
    (["--batch-size", "8"], "--batch-size 8 differs"),
    (["--seed", "1"], "--seed 1 differs"),
    (["--preset", "gpu"], "--preset 'gpu' differs"),
    (["--method", "mio"], "--method 'mio' differs"),
])
def test_resume_refuses_options_that_cannot_change(extra, needle, done_run, tmp_path, capsys):
    out = copy_run(done_run, tmp_path / "r")
    err = fails(["--resume", str(out), "--epochs", "3", *extra], capsys)
    assert needle in err and "start a new run" in err


def test_resume_says_what_changes(done_run, tmp_path, capsys):
    out = copy_run(done_run, tmp_path / "r")
    rep = cli.run(["--resume", str(out), "--epochs", "3", "--moment-momentum", "0.9", "--lr", "1e-3",
                   "--augment", "byol"])
    err = capsys.readouterr().err
    assert "--moment-momentum 0.9 differs from the checkpoint's 0.99" in err
    assert "--lr 0.001 differs from the checkpoint's 0.004" in err
    assert "--augment byol differs from the checkpoint's mild" in err
    assert "--epochs 3 differs from the checkpoint's 2" in err
    assert "the lr goes from" in err and "the EMA momentum from" in err
    assert len(rep["notes"]) == 5 and rep["config"]["moment_momentum"] == 0.9


def test_stop_after_hint_and_options_kept_on_resume(fmnist, tmp_path, capsys):
    out = tmp_path / "r"
    rep = cli.run(tiny(fmnist, out, "--stop-after", "1"))  # tiny() has --no-probe
    stdout = capsys.readouterr().out
    assert f"Stopped after epoch 1 of 2 (--stop-after 1); continue with: minc-train --resume {out}" in stdout
    assert "1 of 2 epochs" in stdout
    assert rep["finished"] is False and rep["resume_command"] == f"minc-train --resume {out}"
    assert json.loads((out / "report.json").read_text())["resume_command"] == rep["resume_command"]
    rep = cli.run(["--resume", str(out)])
    # --no-probe (and --no-progress, --stop-after not) kept: no probes, and the run went to the end
    assert "probes" not in rep and rep["config"]["probe"] is False and rep["config"]["progress"] is False
    assert rep["finished"] is True and "resume_command" not in rep and log_epochs(out) == [1, 2]


def test_report_is_complete(fmnist, tmp_path):
    argv = tiny(fmnist, tmp_path / "r", "--epochs", "1", "--lr", "4e-3", "--batch-size", "16")
    rep = cli.run(argv)
    assert rep["argv"] == ["minc-train", *argv]
    assert rep["lr"]["effective"] == pytest.approx(4e-3 * 16 / 256)
    assert rep["lr"]["base"] == 4e-3 and rep["lr"]["scaling"] == "linear"
    env = rep["environment"]
    for k in ("torch", "minc_kernels", "torchvision", "numpy", "triton", "python", "git_commit",
              "git_dirty", "ema_backend", "loss_backend", "device", "threads", "precision"):
        assert k in env, k
    import numpy
    import torchvision
    assert env["numpy"] == numpy.__version__ and env["torchvision"] == torchvision.__version__
    assert env["ema_backend"] == "foreach"  # --ema-backend foreach in tiny()
    assert env["git_dirty"] in (True, False, None) and rep["finished"] is True


def test_report_resolves_the_auto_ema_backend(fmnist, tmp_path):
    argv = tiny(fmnist, tmp_path / "r", "--epochs", "1")
    argv[argv.index("--ema-backend") + 1] = "auto"
    env = cli.run(argv)["environment"]
    assert env["ema_backend"] in ("extension", "foreach") and env["ema_backend_detail"]
    from minc_kernels import info
    expected = "foreach" if info.collect()["ema_backend"].startswith("torch._foreach_lerp_") else "extension"
    assert env["ema_backend"] == expected


def test_failed_download_is_one_line(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def offline(*a, **k):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://...\n"
                           "<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    # whatever this machine has installed (Debian's dataset-fashion-mnist): not found
    from minc_train import data as data_mod
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", ())
    empty = tmp_path / "nothing"
    empty.mkdir()
    err = fails(["--data-dir", str(empty), "--out-dir", str(tmp_path / "r")], capsys)
    assert "download into" in err and "Name or service not known" in err and "--data-dir" in err
    assert not (tmp_path / "r").exists()


def test_second_program_on_the_same_folder_is_refused(fmnist, done_run, tmp_path, capsys):
    out = copy_run(done_run, tmp_path / "r")
    lock = out / ".minc-train.lock"
    lock.write_text(f"{os.getppid()}\n")  # a live process holds it
    err = fails(["--resume", str(out), "--epochs", "3"], capsys)
    assert "is in use by another minc-train" in err and str(lock) in err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid}\n")  # left by a killed run: taken over, and released at the end
    rep = cli.run(["--resume", str(out), "--epochs", "3"])
    assert rep["history"][-1]["epoch"] == 3 and not lock.exists()


def test_unreadable_report_of_a_finished_run_is_written_again(done_run, tmp_path, capsys):
    out = copy_run(done_run, tmp_path / "r")
    (out / "report.json").write_text('{"config": {"method"')  # truncated by a kill
    rep = cli.run(["--resume", str(out)])
    assert "is unreadable" in capsys.readouterr().err
    assert rep["finished"] and json.loads((out / "report.json").read_text())["finished"]


def test_checkpoint_without_digest_loads_with_a_warning(done_run, tmp_path, capsys):
    out = copy_run(done_run, tmp_path / "r")
    ck = C.read(str(out / "checkpoint.pt"))
    for own in ("format", "format_version", "sha256", "verified"):
        ck.pop(own)
    torch.save(ck, out / "checkpoint.pt")  # as minc-train wrote them before digests
    cli.run(["--resume", str(out), "--epochs", "3"])
    assert "has no digest" in capsys.readouterr().err
    assert C.read(str(out / "checkpoint.pt"))["verified"] is True


def test_resume_into_a_new_folder_leaves_the_original_alone(done_run, tmp_path):
    src = copy_run(done_run, tmp_path / "a")
    before = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()}
    rep = cli.run(["--resume", str(src), "--out-dir", str(tmp_path / "b"), "--epochs", "3"])
    assert [r["epoch"] for r in rep["history"]] == [1, 2, 3] and log_epochs(tmp_path / "b") == [1, 2, 3]
    assert {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()} == before
