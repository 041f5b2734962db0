"""Blocked MIO loss (minc_kernels.ops.mio_cpu) vs the eager reference and a float64 oracle."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minc_kernels import reference
from minc_kernels.ops import mio_cpu
from minc_kernels.ops.mio_cpu import mio_blocked_forward, mio_loss_blocked

TEMPS = [  # (τp, τn, λ)
    (0.5, 0.5, 1.0),
    (0.1, 0.3, 0.5),   # τp != τn
    (0.3, 0.05, 0.0),  # τp != τn, λ = 0, |S/τn| up to 20
]


def _inputs(b, k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, k, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(b, k, generator=g, dtype=torch.float64)  # correlated views
    return z1.to(dtype), z2.to(dtype)


def _loss_and_grads(fn, z1, z2, upstream):
    a = z1.detach().clone().requires_grad_()
    b = z2.detach().clone().requires_grad_()
    loss = fn(a, b)
    (loss * upstream).backward()
    return loss.detach().double(), a.grad.double(), b.grad.double()


def _blocked(tp, tn, lam, block=None):
    rows, cols = block if isinstance(block, tuple) else (block, None)
    return lambda a, b: mio_loss_blocked(a, b, tp, tn, lam, block_rows=rows, block_cols=cols)


def _ref(tp, tn, lam):
    return lambda a, b: reference.mio_loss(a, b, tp, tn, lam)


def _rel(x, y):
    """max |x - y| relative to max |y| (y: the oracle)."""
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()


# (B, k, block_rows or (block_rows, block_cols)): B = 2, odd and prime B, B not a multiple of
# the block, one tile holding both a row and its partner (block > B), 1×1 tiles, square tiles,
# tiles wider and narrower than tall, whole rows of S, the default tiles.
SHAPES = [(2, 3, None), (2, 5, (1, 1)), (3, 17, 2), (7, 20, (3, 3)), (7, 20, (3, 2)),
          (37, 48, (10, 10)), (37, 48, (10, 23)), (37, 48, (13, 7)), (37, 48, 50),
          (64, 16, (24, 24)), (129, 8, None), (129, 8, (40, 1000))]


@pytest.mark.parametrize("b,k,block", SHAPES)
@pytest.mark.parametrize("tp,tn,lam", TEMPS)
def test_float64_matches_reference(b, k, block, tp, tn, lam):
    z1, z2 = _inputs(b, k, seed=b * 100 + k)
    up = torch.tensor(0.37 + b / 11.0, dtype=torch.float64)
    lo, g1o, g2o = _loss_and_grads(_ref(tp, tn, lam), z1, z2, up)
    lb, g1b, g2b = _loss_and_grads(_blocked(tp, tn, lam, block), z1, z2, up)
    torch.testing.assert_close(lb, lo, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g1b, g1o, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g2b, g2o, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("b,k,block", [(2, 3, None), (37, 48, (10, 10)), (300, 64, (128, 200)),
                                       (257, 33, None)])
@pytest.mark.parametrize("tp,tn,lam", TEMPS)
def test_float32_error_matches_eager(b, k, block, tp, tn, lam):
    """float32 error against the float64 oracle is at most ~that of the float32 reference."""
    z1, z2 = _inputs(b, k, seed=b + k)
    up = torch.tensor(1.3, dtype=torch.float64)
    oracle = _loss_and_grads(_ref(tp, tn, lam), z1, z2, up)
    eager = _loss_and_grads(_ref(tp, tn, lam), z1.float(), z2.float(), up.float())
    mine = _loss_and_grads(_blocked(tp, tn, lam, block), z1.float(), z2.float(), up.float())
    for got, ref_, want in zip(mine, eager, oracle):
        err, err_eager = _rel(got, want), _rel(ref_, want)
        assert err <= 3 * err_eager + 1e-6, (err, err_eager)


def test_output_dtypes_and_grad_dtypes():
    for dt, loss_dt in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float16, torch.float32), (torch.float64, torch.float64)]:
        z1, z2 = (t.to(dt).requires_grad_() for t in _inputs(5, 6))
        loss = mio_loss_blocked(z1, z2)
        assert loss.dtype == loss_dt == reference.mio_loss(z1, z2).dtype
        loss.backward()
        assert z1.grad.dtype == dt and z2.grad.dtype == dt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tp,tn,lam", TEMPS)
def test_half_inputs_error_at_most_eager(dtype, tp, tn, lam):
    """16-bit inputs: error vs the float64 oracle at most ~3x the eager reference's (same dtype)."""
    z1, z2 = _inputs(61, 40, seed=7)
    z1, z2 = z1.to(dtype).double(), z2.to(dtype).double()  # the oracle sees the rounded inputs
    up = torch.tensor(0.8, dtype=torch.float64)
    oracle = _loss_and_grads(_ref(tp, tn, lam), z1, z2, up)
    eager = _loss_and_grads(_ref(tp, tn, lam), z1.to(dtype), z2.to(dtype), up.float())
    mine = _loss_and_grads(_blocked(tp, tn, lam, (16, 16)), z1.to(dtype), z2.to(dtype), up.float())
    for got, ref_, want in zip(mine, eager, oracle):
        err, err_eager = _rel(got, want), _rel(ref_, want)
        assert err <= 3 * err_eager + 1e-6, (err, err_eager)


def test_non_contiguous_inputs():
    z1, z2 = _inputs(23, 14, seed=3)
    up = torch.tensor(0.9, dtype=torch.float64)
    # a transposed view and a strided column slice
    a = z1.T.contiguous().T
    b = torch.repeat_interleave(z2, 2, dim=1)[:, ::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    want = _loss_and_grads(_ref(0.2, 0.4, 0.7), z1, z2, up)
    lo = mio_loss_blocked(a.requires_grad_(), b.requires_grad_(), 0.2, 0.4, 0.7, block_rows=5,
                          block_cols=7)
    g1, g2 = torch.autograd.grad(lo * up, (a, b))
    torch.testing.assert_close(lo.detach(), want[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g1, want[1], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g2, want[2], rtol=1e-10, atol=1e-13)


def test_gradcheck_float64_several_tiles():
    z1, z2 = _inputs(5, 4, seed=11)
    z1.requires_grad_()
    z2.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: mio_loss_blocked(a, b, 0.3, 0.6, 0.8, block_rows=3, block_cols=4), (z1, z2))


def test_only_one_input_needs_grad():
    z1, z2 = _inputs(9, 5, seed=2)
    want = _loss_and_grads(_ref(0.5, 0.5, 1.0), z1, z2, torch.tensor(1.0, dtype=torch.float64))
    a = z1.clone().requires_grad_()
    loss = mio_loss_blocked(a, z2, block_rows=4, block_cols=4)
    (g1,) = torch.autograd.grad(loss, (a,))
    torch.testing.assert_close(g1, want[1], rtol=1e-10, atol=1e-13)


def test_no_grad_skips_gradient_and_keeps_value():
    z1, z2 = _inputs(17, 6, seed=5)
    with torch.no_grad():
        loss = mio_loss_blocked(z1.requires_grad_(), z2, block_rows=8)
    torch.testing.assert_close(loss, reference.mio_loss(z1.detach(), z2), rtol=1e-12, atol=1e-13)
    _, dz = mio_blocked_forward(z1.detach(), z2, 0.5, 0.5, 1.0, need_grad=False, block_rows=8,
                                block_cols=8)
    assert dz.numel() == 0


def test_collapsed_batch_sanity_value():
    """docs/math.md §3: a fully collapsed batch at τ = 0.5, λ = 0 gives softplus(-2) + softplus(2)."""
    z = torch.ones(6, 4, dtype=torch.float64)
    loss = mio_loss_blocked(z, z.clone(), 0.5, 0.5, 0.0, block_rows=4)
    assert abs(loss.item() - 2.253856) < 1e-6
    want = math.log1p(math.exp(-2)) + math.log1p(math.exp(2))
    assert math.isclose(loss.item(), want, rel_tol=1e-12)


def test_zero_row_gradient_matches_normalize():
    """Rows with norm below eps (zero, or tiny: ẑ then not unit) take F.normalize's gradient
    g / eps, as the reference, not the unit-sphere projection."""
    z1, z2 = _inputs(4, 3, seed=9)
    z1[1] = 0.0
    z2[2] = torch.tensor([3e-13, -4e-13, 1e-13], dtype=torch.float64)
    up = torch.tensor(1.0, dtype=torch.float64)
    want = _loss_and_grads(_ref(0.5, 0.5, 1.0), z1, z2, up)
    got = _loss_and_grads(_blocked(0.5, 0.5, 1.0, 3), z1, z2, up)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_deterministic():
    z1, z2 = _inputs(70, 9, seed=4, dtype=torch.float32)
    runs = [_loss_and_grads(_blocked(0.5, 0.5, 1.0, (32, 48)), z1, z2, torch.tensor(1.0))
            for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_double_backward_raises():
    z1, z2 = (t.requires_grad_() for t in _inputs(4, 3))
    loss = mio_loss_blocked(z1, z2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, (z1,), create_graph=True)


@pytest.mark.parametrize("name", ["block_rows", "block_cols"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_block_sizes(name, bad):
    z1, z2 = _inputs(4, 3)
    with pytest.raises(ValueError, match=name):
        mio_loss_blocked(z1, z2, **{name: bad})


def test_bad_shapes_and_dtypes():
    z1, z2 = _inputs(4, 3)
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        mio_loss_blocked(z1, z2[:3])
    with pytest.raises(ValueError, match="B >= 2"):
        mio_loss_blocked(z1[:1], z2[:1])
    with pytest.raises(TypeError, match="dtype"):
        mio_loss_blocked(z1, z2.float())
    with pytest.raises(TypeError, match="floating"):
        mio_loss_blocked(z1.long(), z2.long())


@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck(need_grad):
    z1, z2 = (t.float().requires_grad_(need_grad) for t in _inputs(6, 5))
    torch.library.opcheck(torch.ops.minc_kernels.mio_loss_blocked_fwd.default,
                          (z1, z2, 0.4, 0.6, 0.5, need_grad, 4, 3))


def test_torch_compile_fullgraph():
    z1, z2 = _inputs(11, 7, seed=8, dtype=torch.float32)
    fn = torch.compile(
        lambda a, b: mio_loss_blocked(a, b, 0.3, 0.5, 1.0, block_rows=4, block_cols=5),
        fullgraph=True, backend="aot_eager")
    want = _loss_and_grads(_ref(0.3, 0.5, 1.0), z1, z2, torch.tensor(1.0))
    got = _loss_and_grads(fn, z1, z2, torch.tensor(1.0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=1e-7)


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("b", [256, 4096, 8192, 32768, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_blocks_bound_memory(b, dtype):
    """Extra memory at k = 128 stays below 1 GiB up to B = 32768 (issue 15): one tile and its
    buffer, plus the O(N·k) tensors (the copy of [z1; z2], ẑ, ẑ/τn, the gradient and its
    temporaries: at most 8 live at once).  The tile alone stays within its budget at any B."""
    k = 128
    rows, cols = mio_cpu.default_blocks(b, k, dtype)
    n = 2 * b
    assert 1 <= rows <= n and 1 <= cols <= n
    assert rows * cols < n * n or n <= 512          # never the whole of S beyond tiny batches
    tile = mio_cpu.tile_bytes(rows, cols, dtype)
    assert tile <= 2 * mio_cpu.TILE_BUDGET_BYTES
    per_nk = n * k * (8 if dtype == torch.float64 else 4)
    if b <= 32768 and dtype == torch.float32:
        assert tile + 8 * per_nk < mio_cpu.MEMORY_BUDGET_BYTES, (tile, per_nk)


def test_explicit_rows_get_columns_within_budget():
    rows, cols = mio_cpu.default_blocks(32768, 128, torch.float32, block_rows=4096)
    assert rows == 4096 and mio_cpu.tile_bytes(rows, cols) <= 2 * mio_cpu.TILE_BUDGET_BYTES


class _LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("fn,expect_blocked", [
    (lambda z1, z2: mio_blocked_forward(z1, z2, 0.5, 0.5, 1.0, True, 64, 64), True),
    (lambda z1, z2: reference.mio_loss(z1, z2), False),
])
def test_no_tensor_of_n_squared_elements(fn, expect_blocked):
    """No tensor in the blocked forward (gradient included) is bigger than a tile or N·k;
    the same probe sees the reference's N×N matrix (so the probe can fail)."""
    b, k = 300, 16
    z1, z2 = _inputs(b, k, dtype=torch.float32)
    with _LargestAllocation() as probe:
        fn(z1, z2)
    bound = max(64 * 64, 2 * b * k)
    assert (probe.largest <= bound) == expect_blocked, probe.largest


# --------------------------------------------------------------------------- the benchmark
def test_cpu_memory_benchmark_worker_and_report(tmp_path):
    """benchmarks/cpu_memory.py: one tiny case in-process, and the report from its record."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_memory.py"
    spec = importlib.util.spec_from_file_location("cpu_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n_threads = torch.get_num_threads()
    try:
        rec = bench.worker({"provider": "mio/blocked", "b": 64, "threads": 1, "budget_s": 0.5,
                            "max_reps": 2})
    finally:
        torch.set_num_threads(n_threads)
    assert rec["reps"] >= 1 and rec["extra_gib"] >= 0 and math.isfinite(rec["loss"])
    want = reference.mio_loss(*_inputs_like_bench(64)).item()
    assert math.isclose(rec["loss"], want, rel_tol=1e-5)
    cases = [dict(rec, provider=p, b=8192, status="ok", load_before=[1, 1, 1], load_after=[1, 1, 1])
             for p in ("mio/blocked", "mio/handwritten")]
    cases[1]["median_s"] = cases[0]["median_s"] * 2
    data = {"date": "d", "threads": 1, "budget_s": 0.5, "load_start": [1], "load_end": [1],
            "command": "c", "cases": cases,
            "machine": {"cpu": "x", "cores": 2, "mem_gib": 1.0, "torch": "t", "python": "p",
                        "commit": "h"}}
    (tmp_path / "results.json").write_text(__import__("json").dumps(data))
    assert bench.main(["--from-json", str(tmp_path / "results.json")]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "blocked vs handwritten" in text and "-> met" in text


def _inputs_like_bench(b):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(b, 128, generator=g)
    return z1, z1 + 0.7 * torch.randn(b, 128, generator=g)


def test_mio_loss_auto_on_cpu_runs_the_blocked_path():
    """The public MIOLoss (backend "auto") on CPU float32 streams strips of S: no tensor
    near N×N (N = 2B) is ever made, forward and backward; backend="reference" does make one
    (so the probe can fail), and so does float64 (the oracle dtype keeps the reference)."""
    from minc_kernels import MIOLoss

    b, k = 600, 16
    n = 2 * b
    z1, z2 = _inputs(b, k, dtype=torch.float32)
    z1.requires_grad_(True)
    with _LargestAllocation() as probe:
        MIOLoss()(z1, z2).backward()
    assert probe.largest <= n * n // 4, probe.largest
    with _LargestAllocation() as probe:
        MIOLoss(backend="reference")(z1, z2).backward()
    assert probe.largest >= n * n
    with _LargestAllocation() as probe:
        MIOLoss()(z1.detach().double(), z2.double())
    assert probe.largest >= n * n
