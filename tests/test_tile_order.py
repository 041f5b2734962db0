"""The Gram kernels' grouped tile order (kernels.gram.grouped_tile): a permutation of the
tiles, the order benchmarks/tile_order.py models, and no change to any value."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from benchmarks.tile_order import hbm_bytes, rowmat_programs, tile_order  # noqa: E402
from minc_kernels.kernels.gram import _tile  # noqa: E402
from minc_kernels.ops import configs  # noqa: E402
from minc_kernels.ops import gram as G  # noqa: E402


@triton.jit
def _record_tiles(out_ptr, GROUP: tl.constexpr):
    m, n = _tile(GROUP)
    lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(out_ptr + 2 * lin, m)
    tl.store(out_ptr + 2 * lin + 1, n)


@pytest.mark.parametrize("n_m,n_n,group", [(5, 3, 2), (7, 4, 3), (17, 3, 16), (2, 5, 16),
                                           (16, 16, 16), (9, 1, 4), (6, 6, 0)])
def test_tile_order_is_a_permutation_and_the_modelled_order(kernel_device, n_m, n_n, group):
    out = torch.full((n_m * n_n, 2), -1, dtype=torch.int32, device=kernel_device)
    _record_tiles[(n_m, n_n)](out, GROUP=group)
    got = [tuple(t) for t in out.cpu().tolist()]
    assert sorted(got) == [(m, n) for m in range(n_m) for n in range(n_n)]
    if group == 0:  # launch order: axis 0 fastest
        assert got == [(m, n) for n in range(n_n) for m in range(n_m)]
    else:
        assert got == list(tile_order(n_m, n_n, group))
    if group >= n_m:  # one group: the launch order itself
        assert got == [(m, n) for n in range(n_n) for m in range(n_m)]


def test_tile_group_reads_the_environment(monkeypatch):
    monkeypatch.delenv(G.TILE_ORDER_ENV, raising=False)
    want = configs.TILE_GROUP_INTERPRETER if G.interpreting() else configs.TILE_GROUP
    big = 1 << 40
    assert G.tile_group(torch.bfloat16, want + 1, big) == G.tile_group(torch.float16, 99, big) \
        == want > 1
    assert G.tile_group(torch.bfloat16, want, big) == 0  # one group: the grid's own order
    assert G.tile_group(torch.float32, 99, big) == 0  # strict fp32: FMA-bound, the grid's order
    monkeypatch.setenv(G.TILE_ORDER_ENV, "launch")
    assert G.tile_group(torch.bfloat16, 99, big) == 0
    monkeypatch.setenv(G.TILE_ORDER_ENV, "rows")
    with pytest.raises(ValueError, match="MINC_KERNELS_TILE_ORDER must be one of"):
        G.tile_group(torch.bfloat16, 99, big)


def test_tile_group_on_a_gpu_groups_only_past_half_the_l2(monkeypatch):
    """With the device's constants (not the interpreter's): grouped where the grid has more
    than 16 blocks and the operand the grid's order would re-stream exceeds 25 MiB."""
    monkeypatch.delenv(G.TILE_ORDER_ENV, raising=False)
    monkeypatch.setattr(G, "interpreting", lambda: False)
    x_bytes = lambda b, k: b * k * 2  # noqa: E731  (bf16 rows)
    assert G.tile_group(torch.bfloat16, 8192 // 64, x_bytes(8192, 8192)) == configs.TILE_GROUP
    assert G.tile_group(torch.bfloat16, 2048 // 64, x_bytes(2048, 8192)) == configs.TILE_GROUP
    assert G.tile_group(torch.bfloat16, 4096 // 64, x_bytes(4096, 2048)) == 0  # 16 MiB: in L2
    assert G.tile_group(torch.bfloat16, 1024 // 64, x_bytes(1024, 32768)) == 0  # 16 blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_order_changes_no_bit(kernel_device, monkeypatch, dtype):
    """rowmat (both views), the moment (both views and with ``other``) and ``Xᵀ Y`` give the
    same bits in launch order and in the grouped order, on grids of more tiles than a group
    on each axis (the interpreter's tiles are 16 wide, its group 2)."""
    monkeypatch.setenv(G.GRAM_ENV, "triton")
    gen = torch.Generator().manual_seed(5)
    b, k = 83, 70
    x, y, x2, y2 = ((torch.randn(b, k, generator=gen) * 0.4).to(dtype).to(kernel_device)
                    for _ in range(4))
    m = torch.randn(k, k, generator=gen)
    m = (m + m.T).to(kernel_device)
    d = torch.randn(b, generator=gen).to(kernel_device)

    def run():
        pair = G.rowmat_pair((x, m, y, d, None), (x2, m, y2, d, None), 0.7, -0.3, 0.2,
                             False, True)
        return [*(t for view in pair for t in view), G.gram_pair(x, x2), G.gram_dot(x, m),
                G.cross_gram(x, y), G.rowmat(x, m, y, None, 0.5, 0.1, 0.0, True, True)[2]]

    groups = []  # the GROUP each Gram kernel launch is given
    for kernel in (G.rowmat_kernel, G.moment_partial_kernel, G.cross_gram_kernel):
        def spy(*args, _real=kernel.run, **kwargs):
            groups.append(kwargs["GROUP"])
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", spy)

    monkeypatch.setenv(G.TILE_ORDER_ENV, "launch")
    launch = run()
    assert set(groups) == {0} and len(groups) == 5
    groups.clear()
    monkeypatch.setenv(G.TILE_ORDER_ENV, "grouped")
    grouped = run()
    assert set(groups) == {configs.TILE_GROUP_INTERPRETER} and len(groups) == 5
    for a, c in zip(launch, grouped):
        assert torch.equal(a, c)


def test_model_counts_each_block_once_when_everything_fits():
    """The L2 model: with an L2 that holds every operand, each block comes from HBM once,
    in either order; with a small one, the grouped order reads less at B = k = 8192."""
    b, k = 1024, 512
    progs = lambda group: rowmat_programs(b, k, 64, 64, 2, 2, group)  # noqa: E731
    compulsory = b * k * 2 + k * k * 2
    assert hbm_bytes(progs(0), 264, l2=1 << 40) == compulsory
    assert hbm_bytes(progs(16), 264, l2=1 << 40) == compulsory
    big = lambda group: rowmat_programs(8192, 8192, 64, 64, 2, 2, group)  # noqa: E731
    assert hbm_bytes(big(16), 264) < hbm_bytes(big(0), 264) / 4
