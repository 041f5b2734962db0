"""The MINC variants study (``python -m minc_train.studies.minc_variants``): its --quick path
end to end on a tiny generated Fashion-MNIST (moved from tests/test_lightly.py: it needs the
application, so it lives with the application's tests)."""
import pytest
import torch


def _write_idx(path, arr):
    import gzip
    import struct
    code = {1: 0x0801, 3: 0x0803}[arr.dim()]
    header = struct.pack(">I", code) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.to(torch.uint8).numpy().tobytes())


def test_minc_variants_study_quick(tmp_path):
    """The variant study's --quick path end to end on a tiny generated Fashion-MNIST: one JSON
    per run, results.json, table.md and the plot; a second call reuses the saved runs."""
    import json
    import os
    pytest.importorskip("matplotlib")
    from minc_train.studies import minc_variants
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    for split, n in (("train", 96), ("t10k", 48)):
        _write_idx(data / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g))
        _write_idx(data / f"{split}-labels-idx1-ubyte.gz", torch.arange(n) % 10)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--quick", "--seeds", "1", "--methods", "minc-l2,minc-none,byol,spectral",
            "--data-dir", str(data), "--out", str(out), "--work-dir", str(work)]
    assert minc_variants.main(argv) == 0
    runs = sorted(os.listdir(out / "runs"))
    assert len(runs) == 2 * 4 + 1  # 2 recipes x 4 methods + the seed's baselines
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["runs_done"] == res["meta"]["runs_planned"] == 8
    assert all(r["images_seen"] == r["steps"] * 32 for r in res["runs"])
    assert (out / "table.md").read_text().count("| MINC") == 2
    assert (out / "minc_variants.png").stat().st_size > 0
    before = {f: os.path.getmtime(out / "runs" / f) for f in runs}
    assert minc_variants.main(argv) == 0  # resumed: nothing re-run
    assert {f: os.path.getmtime(out / "runs" / f) for f in runs} == before
