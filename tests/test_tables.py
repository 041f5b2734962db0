"""Measured decision tables (minc_kernels.ops.tables): parsing, interpolation, the override
variable, and that ``auto`` runs what a table says (spectral/Barlow Twins/VICReg algorithm,
Gram-layer backend), end to end through the ops under the interpreter; and the calibration
script's CPU dry run writes a table the loader accepts."""
import json
import math
import os

import pytest
import torch

from minc_kernels.ops import tables as T


def _grid(rows, cols, **ms):
    return {"rows": rows, "cols": cols, "ms": ms}


def _table(decisions, family="sm90"):
    return {"schema": T.SCHEMA, "family": family, "provenance": {"device": "test"},
            "decisions": decisions}


@pytest.fixture(autouse=True)
def _fresh_cache():
    T.clear_cache()
    yield
    T.clear_cache()


def test_choice_at_grid_points_between_them_and_at_the_edges():
    # pairwise grows as rows², gram as cols²: the crossover is rows = cols
    rows, cols = [256, 1024, 4096], [256, 1024, 4096]
    pw = [[r * r / 1e5 for c in cols] for r in rows]
    gr = [[c * c / 1e5 for c in cols] for r in rows]
    g = T.parse(_table({"d": _grid(rows, cols, pairwise=pw, gram=gr)})).decisions["d"]
    assert g.choose(256, 4096, ("pairwise", "gram")) == "pairwise"
    assert g.choose(4096, 256, ("pairwise", "gram")) == "gram"
    # between grid points, log-log interpolation is exact for power laws: rows 600 < cols 700
    assert g.choose(600, 700, ("pairwise", "gram")) == "pairwise"
    assert g.choose(700, 600, ("pairwise", "gram")) == "gram"
    # within a factor 2 outside the grid the edge answers; beyond it the table says nothing
    assert g.choose(8192, 256, ("pairwise", "gram")) == "gram"
    assert g.choose(8193, 256, ("pairwise", "gram")) is None
    assert g.choose(127, 4096, ("pairwise", "gram")) is None
    # a candidate the table does not hold, or a decision it lacks: no answer
    assert g.choose(256, 256, ("pairwise", "cublas")) is None
    assert T.parse(_table({})).choose("d", 256, 256, ("pairwise", "gram")) is None


def test_interpolation_is_bilinear_in_log_time():
    rows, cols = [100, 400], [100, 400]
    a = [[1.0, 1.0], [1.0, 1.0]]
    b = [[0.5, 2.0], [2.0, 2.0]]  # log-mean over the 4 corners at the centre: 2**(1/4) > 1
    g = T.parse(_table({"d": _grid(rows, cols, a=a, b=b)})).decisions["d"]
    assert g.choose(200, 200, ("a", "b")) == "a"  # centre: b = 0.5^.25 · 2^.75 = 1.41
    assert g.choose(100, 100, ("a", "b")) == "b"
    # at (rows 100, cols between): b = 0.5^(1-w) 2^w with w = log(c/100)/log 4: < 1 until c = 200
    assert g.choose(100, 190, ("a", "b")) == "b"
    assert g.choose(100, 210, ("a", "b")) == "a"


def test_missing_cells_give_no_answer_where_they_are_needed():
    rows, cols = [256, 1024], [256, 1024]
    g = T.parse(_table({"d": _grid(rows, cols, a=[[1.0, None], [1.0, 1.0]],
                                   b=[[2.0, 2.0], [2.0, 2.0]])})).decisions["d"]
    assert g.choose(256, 256, ("a", "b")) == "a"  # the missing corner has weight 0
    assert g.choose(256, 1024, ("a", "b")) is None
    assert g.choose(512, 512, ("a", "b")) is None


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(schema=2), "schema"),
    (lambda d: d.update(family=""), "family"),
    (lambda d: d["decisions"]["d"].update(rows=[1024, 256]), "rows"),
    (lambda d: d["decisions"]["d"].update(cols=[256, True]), "cols"),
    (lambda d: d["decisions"]["d"]["ms"].update(a=[[1.0, 1.0]]), "ms['a']"),
    (lambda d: d["decisions"]["d"]["ms"]["a"][0].__setitem__(0, -1.0), "ms['a']"),
    (lambda d: d["decisions"]["d"]["ms"]["a"][0].__setitem__(0, float("nan")), "ms['a']"),
    (lambda d: d["decisions"]["d"]["ms"].pop("b"), "at least two candidates"),
])
def test_a_damaged_table_is_an_error_naming_the_file_and_field(mutate, field):
    data = _table({"d": _grid([256, 1024], [256, 1024], a=[[1.0, 1.0], [1.0, 1.0]],
                              b=[[1.0, 1.0], [1.0, 1.0]])})
    mutate(data)
    with pytest.raises(ValueError) as err:
        T.parse(data, "some/sm90.json")
    assert "some/sm90.json" in str(err.value) and field in str(err.value)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        T.load_file(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json.*is not JSON"):
        T.load_file(bad)


def test_only_cuda_devices_have_a_family():
    assert T.family(torch.device("cpu")) is None
    assert T.family(torch.device("meta")) is None  # the static suite: always the cost model
    assert T.choose("spectral/bf16/grad", torch.device("cpu"), 256, 256, ("pairwise", "gram")) is None


def test_shipped_tables_parse():
    """Every table in the package loads (a damaged one would fail every auto call on its GPU
    family)."""
    for path in sorted(T.shipped_path("x").parent.glob("*.json")):
        table = T.load_file(path)
        assert table.family == path.stem, f"{path} holds family {table.family}"
        for name in table.decisions:
            head = name.split("/")[0]
            assert head in ("spectral", "barlow_twins", "vicreg") or head.startswith("gram."), name


# --------------------------------------------------------------------------- auto, end to end
kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def cpu_is_sm90(monkeypatch, tmp_path):
    """Make the CPU look like the 'sm90' family and point MINC_KERNELS_TABLE at a file the test
    writes: returns write(decisions)."""
    real = T.family
    monkeypatch.setattr(T, "family", lambda d: "sm90" if d.type == "cpu" else real(d))
    path = tmp_path / "sm90.json"

    def write(decisions):
        path.write_text(json.dumps(_table(decisions)))
        monkeypatch.setenv(T.TABLE_ENV, str(path))
        T.clear_cache()
    return write


def _algorithm_grid(winner):
    rows, cols = [8, 64], [8, 64]
    fast = [[1.0, 1.0], [1.0, 1.0]]
    slow = [[3.0, 3.0], [3.0, 3.0]]
    return _grid(rows, cols, pairwise=fast if winner == "pairwise" else slow,
                 matrix=fast if winner == "matrix" else slow,
                 gram=fast if winner == "gram" else slow)


@kernels
@pytest.mark.parametrize("winner", ["pairwise", "matrix", "gram"])
def test_spectral_auto_runs_the_tables_choice(cpu_is_sm90, monkeypatch, winner):
    from minc_kernels.ops import spectral as S
    cpu_is_sm90({"spectral/fp32/grad": _algorithm_grid(winner)})
    calls = []
    real_pairwise, real_matrix = S._pairwise, S._matrix
    real_gram, real_gram_grad = S.gram, S._gram_grad
    monkeypatch.setattr(S, "_pairwise", lambda *a: calls.append("pairwise") or real_pairwise(*a))
    monkeypatch.setattr(S, "_matrix", lambda *a: calls.append("matrix") or real_matrix(*a))
    monkeypatch.setattr(S, "gram", lambda *a: calls.append("gram") or real_gram(*a))
    monkeypatch.setattr(S, "_gram_grad", lambda *a: calls.append("gram") or real_gram_grad(*a))
    z1, z2 = torch.randn(12, 16), torch.randn(12, 16)
    got = S.spectral_forward(z1, z2, 1.0, True, "auto", True)
    assert set(calls) == {winner}
    want = S.spectral_forward(z1, z2, 1.0, True, winner, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    calls.clear()
    # no table entry for the no-gradient call: the cost model decides there
    S.spectral_forward(z1, z2, 1.0, True, "auto", False)
    assert set(calls) == {S.model_choice(12, 16, torch.float32, False)}


@kernels
@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
@pytest.mark.parametrize("winner", ["pairwise", "gram"])
def test_barlow_and_vicreg_auto_run_the_tables_choice(cpu_is_sm90, monkeypatch, loss, winner):
    from minc_kernels.ops import barlow_twins as BT
    from minc_kernels.ops import vicreg as VR
    cpu_is_sm90({f"{loss}/fp32/grad": _algorithm_grid(winner)})
    mod = BT if loss == "barlow_twins" else VR
    # the N×N path standardises/centres into transposed (k, N) buffers, the k×k path not
    calls = []
    real = mod.col_stats
    monkeypatch.setattr(mod, "col_stats",
                        lambda *a, transposed: calls.append(transposed) or real(*a, transposed=transposed))
    za, zb = torch.randn(12, 16), torch.randn(12, 16)
    if loss == "barlow_twins":
        mod.barlow_twins_forward(za, zb, 5e-3, "auto", True)
    else:
        mod.vicreg_forward(za, zb, 25.0, 25.0, 1.0, 1e-4, "auto", True)
    assert calls == [winner == "pairwise"]


@kernels
@pytest.mark.parametrize("winner", ["triton", "cublas"])
def test_gram_layer_auto_runs_the_tables_choice(cpu_is_sm90, monkeypatch, winner):
    from minc_kernels.ops import gram as G
    monkeypatch.delenv(G.GRAM_ENV, raising=False)
    fast, slow = [[1.0, 1.0], [1.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]
    cpu_is_sm90({"gram.gram/fp32": _grid([8, 64], [8, 64], triton=fast if winner == "triton" else slow,
                                         cublas=fast if winner == "cublas" else slow)})
    x = torch.randn(20, 12)
    assert G.gram_backend("gram", x) == winner
    assert G.gram_backend("rowmat", x) == "triton"  # no entry for rowmat: the kernels
    assert G.gram_backend("gram", x.to(torch.bfloat16)) == "triton"  # nor for bf16
    launched = []
    real = G._gram_launch
    monkeypatch.setattr(G, "_gram_launch", lambda *a: launched.append(1) or real(*a))
    torch.testing.assert_close(G.gram(x), x.T @ x, rtol=1e-5, atol=1e-5)
    assert bool(launched) == (winner == "triton")
    # an explicit MINC_KERNELS_GRAM overrides the table
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    assert G.gram_backend("gram", x) == "triton"


@kernels
def test_rowmat_on_a_rounded_g_asks_its_own_decision(cpu_is_sm90, monkeypatch):
    """rowmat against a G already in the rows' bf16 (one native dot per tile, the bf16
    spectral and Barlow Twins gradients) races one bf16 GEMM; against a fp32 G (the split's
    dots) three: the table keeps them apart, and a fp32 G's entry does not decide for it."""
    from minc_kernels.ops import gram as G
    monkeypatch.delenv(G.GRAM_ENV, raising=False)
    fast, slow = [[1.0, 1.0], [1.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]
    cpu_is_sm90({"gram.rowmat_rounded/bf16": _grid([8, 64], [8, 64], triton=slow,
                                                   triton_wide=slow, cublas=fast),
                 "gram.rowmat/bf16": _grid([8, 64], [8, 64], triton=fast, cublas=slow)})
    x = torch.randn(20, 12).to(torch.bfloat16)
    g = torch.randn(12, 12)
    g = g + g.T
    cublas_calls = []
    real = G._rowmat_mm
    monkeypatch.setattr(G, "_rowmat_mm", lambda *a: cublas_calls.append(a[1].dtype) or real(*a))
    G.rowmat(x, g, x, None, 1.0, 0.0, 0.0, False, True)
    G.rowmat(x, g.to(torch.bfloat16), x, None, 1.0, 0.0, 0.0, False, True)
    G.rowmat_pair((x, g.to(torch.bfloat16), x, None, None),
                  (x, g.to(torch.bfloat16), x, None, None), 1.0, 0.0, 0.0, False, True)
    assert cublas_calls == [torch.bfloat16] * 3  # the rounded G's three calls, not the fp32 one
    assert G._rowmat_launcher(x.float(), g) == "rowmat"  # fp32 rows: one kind only
    # where the table says the wide tiles win, auto launches them
    cpu_is_sm90({"gram.rowmat_rounded/bf16": _grid([8, 64], [8, 64], triton=slow,
                                                   triton_wide=fast, cublas=slow)})
    tiles = []
    real_cfg = G.configs.rowmat_config
    monkeypatch.setattr(G.configs, "rowmat_config",
                        lambda *a, **kw: tiles.append(kw.get("wide")) or real_cfg(*a, **kw))
    G.rowmat(x, g.to(torch.bfloat16), x, None, 1.0, 0.0, 0.0, False, True)
    G.rowmat(x, g, x, None, 1.0, 0.0, 0.0, False, True)
    assert tiles == [True, False]


def test_table_override_none_and_other_families(cpu_is_sm90, monkeypatch, tmp_path):
    cpu_is_sm90({"spectral/fp32/grad": _algorithm_grid("pairwise")})
    dev = torch.device("cpu")
    assert T.choose("spectral/fp32/grad", dev, 8, 8, ("pairwise", "gram")) == "pairwise"
    monkeypatch.setenv(T.TABLE_ENV, "none")
    assert T.choose("spectral/fp32/grad", dev, 8, 8, ("pairwise", "gram")) is None
    other = tmp_path / "sm100.json"
    other.write_text(json.dumps(_table({"spectral/fp32/grad": _algorithm_grid("gram")},
                                       family="sm100")))
    monkeypatch.setenv(T.TABLE_ENV, str(other))
    assert T.choose("spectral/fp32/grad", dev, 8, 8, ("pairwise", "gram")) is None
    monkeypatch.setenv(T.TABLE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="missing.json"):
        T.choose("spectral/fp32/grad", dev, 8, 8, ("pairwise", "gram"))


@kernels
def test_calibrate_dry_run_writes_a_table_the_loader_uses(tmp_path, monkeypatch):
    """benchmarks.calibrate under the interpreter: a table of every cell it measured, a
    Markdown report, and a family ('interpret') the loader can be pointed at."""
    from benchmarks import calibrate
    # setenv first: monkeypatch then restores the variable calibrate.main sets (to its table)
    monkeypatch.setenv(T.TABLE_ENV, "none")
    out = tmp_path / "cal"
    rc = calibrate.main(["--interpret", "--rows", "8,16", "--cols", "8", "--dtype", "fp32",
                         "--decisions", "gram.gram,spectral", "--case-ms", "1", "--quiet",
                         "--out", str(out)])
    assert rc == 0
    table = T.load_file(out / "table.json")
    assert table.family == "interpret"
    assert set(table.decisions) == {"gram.gram/fp32", "spectral/fp32/grad"}
    for grid in table.decisions.values():
        assert all(v is not None and v > 0 for m in grid.ms.values() for row in m for v in row)
    md = (out / "calibration.md").read_text()
    assert "## `spectral/fp32/grad`: pairwise vs matrix vs gram" in md
    assert "measured shapes differ" in md
    monkeypatch.setattr(T, "family", lambda d: "interpret")
    monkeypatch.setenv(T.TABLE_ENV, str(out / "table.json"))
    T.clear_cache()
    g = table.decisions["spectral/fp32/grad"]
    algos = ("pairwise", "matrix", "gram")
    want = min(algos, key=lambda c: g.ms[c][0][0])
    assert T.choose("spectral/fp32/grad", torch.device("cpu"), 8, 8, algos) == want


@kernels
def test_calibrate_measures_the_rounded_rowmat_in_half_runs_only(tmp_path, monkeypatch):
    from benchmarks import calibrate
    monkeypatch.setenv(T.TABLE_ENV, "none")
    names = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        assert calibrate.main(["--interpret", "--rows", "8", "--cols", "8", "--dtype", dtype,
                               "--decisions", "gram.rowmat,gram.rowmat_rounded",
                               "--case-ms", "1", "--quiet", "--out", str(out)]) == 0
        names[dtype] = set(T.load_file(out / "table.json").decisions)
    assert names == {"fp32": {"gram.rowmat/fp32"},
                     "bf16": {"gram.rowmat/bf16", "gram.rowmat_rounded/bf16"}}
    rounded = T.load_file(tmp_path / "bf16" / "table.json").decisions["gram.rowmat_rounded/bf16"]
    assert set(rounded.ms) == {"triton", "triton_wide", "cublas"}
    # the case really runs G in the rows' dtype
    monkeypatch.setattr("minc_kernels.ops.gram.rowmat",
                        lambda x, g, *a: (x.dtype, g.dtype))
    x_dtype, g_dtype = calibrate.case_fn("gram.rowmat_rounded", "triton", 8, 8,
                                         torch.bfloat16, torch.device("cpu"), True)()
    assert x_dtype == g_dtype == torch.bfloat16


def test_calibrate_refuses_bad_arguments(capsys):
    from benchmarks import calibrate
    with pytest.raises(SystemExit):
        calibrate.parse_args(["--decisions", "gram.nope"])
    assert "gram.nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        calibrate.parse_args(["--rows", "1,x"])


def test_interpolation_helpers_agree_with_a_direct_formula():
    rows, cols = [100, 1000], [10, 10000]
    vals = [[1.0, 8.0], [4.0, 32.0]]
    g = T.parse(_table({"d": _grid(rows, cols, a=vals, b=vals)})).decisions["d"]
    ri, ci = T._bracket(g.rows, 316), T._bracket(g.cols, 100)
    wr = math.log(316 / 100) / math.log(10)
    wc = math.log(100 / 10) / math.log(1000)
    want = math.exp((1 - wr) * (1 - wc) * math.log(1) + (1 - wr) * wc * math.log(8)
                    + wr * (1 - wc) * math.log(4) + wr * wc * math.log(32))
    assert T._interpolate(g.ms["a"], ri, ci) == pytest.approx(want, rel=1e-12)
