"""DDP parity (docs/math.md §5): W=2 gloo processes with B/2 samples each vs one process with B.

One spawned run (module fixture ``dist_results``) performs every distributed check and
saves each rank's results; the tests below compare them with single-process runs done
here.  float64 everywhere, so parity is checked to ~1e-12, far below the size of any
scaling bug.  Tests that monkeypatch the collectives' backwards to the classic
mis-scaled forms show that these comparisons do catch a 1/W gradient.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

import minc_kernels as mk
from dist_helpers import free_port, spawn
from minc_kernels import distributed as D
from minc_kernels import functional as Fn

W = 2
DT = torch.float64
D_IN, K = 6, 5
EQUAL = (4, 4)
UNEQUAL = (3, 5)
LR = 0.5
TOL = dict(rtol=1e-10, atol=1e-12)
SPAWN_TIMEOUT_S = 240

if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)


# --------------------------------------------------------------------------- shared problem
def _data(seed: int, n: int, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, D_IN, generator=g, dtype=DT)
    x2 = x1 + 0.5 * torch.randn(n, D_IN, generator=g, dtype=DT)
    return x1.to(dtype), x2.to(dtype)


class _Net(nn.Module):
    """Encoder (MomentumEncoder target) + predictor; ``forward`` returns the projection."""

    def __init__(self, seed: int, predictor: bool = False, dtype=DT):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, K)).to(dtype)
        self.pred = nn.Linear(K, K).to(dtype) if predictor else nn.Identity()

    def forward(self, x):
        return self.pred(self.enc(x))


def _make_loss(kind: str, gather: bool, comm: str = "auto", backend=None):
    if kind == "spectral":
        # mu=0.5: with these shapes some rows are clipped and some are not (checked below).
        return mk.SpectralContrastiveLoss(mu=0.5, gather_distributed=gather, dist_comm=comm,
                                          backend=backend)
    if kind == "mio":
        return mk.MIOLoss(pos_temperature=0.5, neg_temperature=0.3, lambda_l2=0.7,
                          gather_distributed=gather)
    raise ValueError(kind)


def _train(kind, sizes, rank, comm="auto", steps=2, ddp=True, seed=0, dtype=DT, backend=None):
    """``steps`` SGD steps of ``_Net`` on the rows of ``rank`` (all rows when not ddp)."""
    net = _Net(seed, dtype=dtype)
    model = nn.parallel.DistributedDataParallel(net) if ddp else net
    loss_fn = _make_loss(kind, gather=ddp, comm=comm, backend=backend)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    lo = sum(sizes[:rank]) if ddp else 0
    hi = lo + sizes[rank] if ddp else sum(sizes)
    losses = []
    for step in range(steps):
        x1, x2 = _data(100 + step, sum(sizes), dtype)
        n = hi - lo
        z = model(torch.cat([x1[lo:hi], x2[lo:hi]]))
        loss = loss_fn(z[:n], z[n:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"loss": losses, "params": [p.detach().clone() for p in net.parameters()]}


def _train_minc(sizes, rank, ddp=True, gather=True, steps=3, seed=1, dtype=DT, backend=None):
    """Symmetric MINC with an EMA target; returns losses, params, targets and M per step."""
    net = _Net(seed, predictor=True, dtype=dtype)
    model = nn.parallel.DistributedDataParallel(net) if ddp else net
    target = mk.MomentumEncoder(net.enc)
    # feature_norm="none": the parity checks below emulate the raw form with Fn.minc_loss.
    loss_fn = mk.MINCLoss(K, moment_momentum=0.5, gather_distributed=gather, backend=backend,
                          feature_norm="none")
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    lo = sum(sizes[:rank]) if ddp else 0
    hi = lo + sizes[rank] if ddp else sum(sizes)
    out = {"loss": [], "moment": []}
    for step in range(steps):
        x1, x2 = _data(200 + step, sum(sizes), dtype)
        x1, x2 = x1[lo:hi], x2[lo:hi]
        n = hi - lo
        p = model(torch.cat([x1, x2]))
        t1, t2 = target(x1), target(x2)
        loss = loss_fn((p[:n], p[n:]), (t2, t1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        target.update(0.9)
        out["loss"].append(loss.item())
        out["moment"].append(loss_fn.corrected_moment().clone())
    out["params"] = [p.detach().clone() for p in net.parameters()]
    out["target"] = [p.detach().clone() for p in target.target.parameters()]
    return out


def _train_ema_bn(rank, sync=None, steps=2):
    """MomentumEncoder of a DDP-trained net with BatchNorm; ``sync``: D.sync_buffers_ op."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(D_IN, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, K)).to(DT)
    model = nn.parallel.DistributedDataParallel(net)
    target = mk.MomentumEncoder(net)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(steps):
        x, _ = _data(300 + step, 8)
        loss = model(x[4 * rank: 4 * rank + 4]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        target.update(0.9)
        if sync is not None:
            D.sync_buffers_(target.target, op=sync)
    return {"params": [p.clone() for p in target.target.parameters()],
            "buffers": [b.clone() for b in target.target.buffers()]}


# --------------------------------------------------------------------------- mis-scaled backwards
def _identity_all_reduce_backward(ctx, grad):
    return grad, None  # the classic bug: no sum over ranks, so the update is 1/W too small


def _local_slice_all_gather_backward(ctx, grad):
    start = sum(ctx.sizes[: ctx.rank])
    return grad[start: start + ctx.sizes[ctx.rank]].contiguous(), None, None  # no sum over ranks


def _broken():
    return (mock.patch.object(D._AllReduceSum, "backward",
                              staticmethod(_identity_all_reduce_backward)),
            mock.patch.object(D._AllGather, "backward",
                              staticmethod(_local_slice_all_gather_backward)))


# --------------------------------------------------------------------------- worker
def _collective_checks(rank):
    """Gradients of our collectives and of torch.distributed.nn's, for a rank-dependent upstream."""
    import torch.distributed.nn.functional as tdnn

    res = {}
    x = torch.arange(3, dtype=DT) + 10 * rank
    c = torch.tensor([1.0, 2.0, 3.0], dtype=DT) * (rank + 1)  # d(loss_r)/dy differs per rank
    for name, fn in (("ours_reduce", D.all_reduce_sum), ("tdnn_reduce", tdnn.all_reduce)):
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * c).sum().backward()
        res[name] = (y.detach(), xi.grad.clone())
    for name, n in (("ours_gather_equal", 2), ("ours_gather_unequal", 1 + 2 * rank)):
        xi = (torch.arange(n * 2, dtype=DT).reshape(n, 2) + 100 * rank).requires_grad_(True)
        y = D.all_gather(xi)
        up = torch.arange(y.numel(), dtype=DT).reshape(y.shape) * (rank + 1)
        (y * up).sum().backward()
        res[name] = (y.detach(), xi.grad.clone())
    xi = (torch.arange(4, dtype=DT).reshape(2, 2) + 100 * rank).requires_grad_(True)
    y = torch.cat(tdnn.all_gather(xi))
    (y * torch.arange(y.numel(), dtype=DT).reshape(y.shape) * (rank + 1)).sum().backward()
    res["tdnn_gather_equal"] = (y.detach(), xi.grad.clone())
    res["helpers"] = (D.is_distributed(), D.world_size(), D.rank())
    t = _data(400, 4)[0][2 * rank: 2 * rank + 2]
    res["moment_sum"] = Fn.minc_moment_sum(t, gather_distributed=True)
    return res


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    res = {}

    def run(name, fn):
        try:
            res[name] = fn()
        except Exception:  # recorded, reported by the test that reads it
            res[name] = {"error": traceback.format_exc()}

    run("collectives", lambda: _collective_checks(rank))
    for comm in ("gram", "gather", "auto"):
        run(f"spectral_{comm}", lambda: _train("spectral", EQUAL, rank, comm))
    run("spectral_unequal_gram", lambda: _train("spectral", UNEQUAL, rank, "gram"))
    run("spectral_unequal_gather", lambda: _train("spectral", UNEQUAL, rank, "gather"))
    run("mio", lambda: _train("mio", EQUAL, rank))
    run("mio_unequal", lambda: _train("mio", UNEQUAL, rank))
    for comm in ("gram", "gather"):
        def broken_spectral(comm=comm):
            a, b = _broken()
            with a, b:
                return _train("spectral", EQUAL, rank, comm, steps=1)
        run(f"spectral_{comm}_broken", broken_spectral)

    def broken_mio():
        a, b = _broken()
        with a, b:
            return _train("mio", EQUAL, rank, steps=1)
    run("mio_broken", broken_mio)
    run("minc", lambda: _train_minc(EQUAL, rank))
    run("minc_unequal", lambda: _train_minc(UNEQUAL, rank, steps=1))
    run("minc_local_moment", lambda: _train_minc(EQUAL, rank, gather=False, steps=1))
    # The Triton kernels (interpreted on the CPU) composed on gathered/all-reduced tensors.
    f32 = torch.float32
    run("spectral_gather_triton", lambda: _train("spectral", EQUAL, rank, "gather", dtype=f32,
                                                 backend="triton"))
    run("minc_triton", lambda: _train_minc(EQUAL, rank, steps=2, dtype=f32, backend="triton"))
    for sync in (None, "mean", "broadcast"):
        run(f"ema_bn_{sync}", lambda sync=sync: _train_ema_bn(rank, sync))
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results():
    with tempfile.TemporaryDirectory() as outdir:
        spawn(_worker, (free_port(), outdir), nprocs=W, timeout_s=SPAWN_TIMEOUT_S)
        yield [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
               for r in range(W)]


def _get(results, name):
    out = []
    for r, res in enumerate(results):
        v = res[name]
        if isinstance(v, dict) and "error" in v:
            pytest.fail(f"rank {r}, check {name!r} raised:\n{v['error']}")
        out.append(v)
    return out


def _assert_params(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tol or TOL))


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ------------------------------------------------------------------ tests: no process group
def test_helpers_without_process_group():
    assert not dist.is_initialized()
    assert D.is_distributed() is False and D.world_size() == 1 and D.rank() == 0
    x = torch.randn(3, 4)
    assert D.all_reduce_sum(x) is x and D.all_gather(x) is x
    assert D.gather_sizes(3, x.device) == [3]


@pytest.mark.parametrize("comm", ["auto", "gram", "gather"])
def test_gather_distributed_is_a_noop_without_process_group(comm):
    z1, z2 = torch.randn(7, 5, dtype=DT), torch.randn(7, 5, dtype=DT)
    torch.testing.assert_close(
        Fn.spectral_contrastive_loss(z1, z2, 0.5, gather_distributed=True, dist_comm=comm),
        Fn.spectral_contrastive_loss(z1, z2, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(Fn.mio_loss(z1, z2, gather_distributed=True), Fn.mio_loss(z1, z2),
                               rtol=0, atol=0)
    torch.testing.assert_close(Fn.minc_moment_sum(z1, gather_distributed=True),
                               Fn.minc_moment_sum(z1), rtol=0, atol=0)
    a, b = mk.MINCLoss(5, gather_distributed=True), mk.MINCLoss(5)
    torch.testing.assert_close(a(z1, z2), b(z1, z2), rtol=0, atol=0)
    torch.testing.assert_close(a.moment, b.moment, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dist_comm"):
        mk.SpectralContrastiveLoss(dist_comm="ring")
    with pytest.raises(ValueError, match="B >= 2"):  # the single-process minimum still applies
        Fn.spectral_contrastive_loss(z1[:1], z2[:1], gather_distributed=True)


def test_spectral_dist_comm_choice():
    # fp32 features: Grams cost 4(2k²+3)·4 bytes, the gather 4Bk·4: Grams win for k < B/2.
    assert Fn.spectral_dist_comm_choice(k=128, global_batch=4096, feature_bytes=4) == "gram"
    assert Fn.spectral_dist_comm_choice(k=8192, global_batch=1024, feature_bytes=4) == "gather"
    assert Fn.spectral_dist_comm_choice(k=1000, global_batch=2010, feature_bytes=4) == "gram"
    assert Fn.spectral_dist_comm_choice(k=1000, global_batch=1990, feature_bytes=4) == "gather"
    # bf16 features halve the gather's bytes: the crossover moves to k ≈ B/4.
    assert Fn.spectral_dist_comm_choice(k=1000, global_batch=2010, feature_bytes=2) == "gather"
    # The test problem (k=5, B=8, float64) takes the gather path under "auto".
    assert Fn.spectral_dist_comm_choice(K, sum(EQUAL), 8, 8) == "gather"


def test_test_problem_exercises_both_clip_branches():
    net = _Net(0)
    with torch.no_grad():
        x1, x2 = _data(100, sum(EQUAL))
        norms = net(torch.cat([x1, x2])).norm(dim=1)
    r = 0.5 ** 0.5
    assert (norms >= r).any() and (norms < r).any()


# --------------------------------------------------------------------------- tests: collectives
def test_collectives_forward_and_backward(dist_results):
    res = _get(dist_results, "collectives")
    c_sum = torch.tensor([1.0, 2.0, 3.0], dtype=DT) * 3  # Σ_r c_r, c_r = c·(r+1)
    x_sum = torch.arange(3, dtype=DT) * 2 + 10
    t = _data(400, 4)[0]
    for r in range(W):
        torch.testing.assert_close(res[r]["moment_sum"], t.T @ t, **TOL)
    for r in range(W):
        assert res[r]["helpers"] == (True, W, r)
        for name in ("ours_reduce", "tdnn_reduce"):
            y, g = res[r][name]
            torch.testing.assert_close(y, x_sum, rtol=0, atol=0)
            # The backward is the SUM over ranks of the upstream gradients (torch's too).
            torch.testing.assert_close(g, c_sum, rtol=0, atol=0)
    for name, sizes in (("ours_gather_equal", [2, 2]), ("tdnn_gather_equal", [2, 2]),
                        ("ours_gather_unequal", [1, 3])):
        full = torch.cat([torch.arange(n * 2, dtype=DT).reshape(n, 2) + 100 * r
                          for r, n in enumerate(sizes)])
        up_sum = torch.arange(full.numel(), dtype=DT).reshape(full.shape) * 3
        for r in range(W):
            y, g = res[r][name]
            torch.testing.assert_close(y, full, rtol=0, atol=0)
            start = sum(sizes[:r])
            # Sum over ranks of the upstream gradient, local rows kept.
            torch.testing.assert_close(g, up_sum[start:start + sizes[r]], rtol=0, atol=0)


# --------------------------------------------------------------------------- tests: spectral, MIO
@pytest.mark.parametrize("name,kind,sizes", [
    ("spectral_gram", "spectral", EQUAL),
    ("spectral_gather", "spectral", EQUAL),
    ("spectral_auto", "spectral", EQUAL),
    ("spectral_unequal_gram", "spectral", UNEQUAL),
    ("spectral_unequal_gather", "spectral", UNEQUAL),
    ("mio", "mio", EQUAL),
    ("mio_unequal", "mio", UNEQUAL),
])
def test_ddp_parity(dist_results, name, kind, sizes):
    """Global loss on every rank == single-process loss; parameters after 2 steps equal."""
    single = _train(kind, sizes, 0, ddp=False)
    ranks = _get(dist_results, name)
    for r in range(W):
        torch.testing.assert_close(torch.tensor(ranks[r]["loss"]), torch.tensor(single["loss"]),
                                   **TOL)
        _assert_params(ranks[r]["params"], single["params"])
    # DDP keeps the replicas bit-identical.
    _assert_params(ranks[1]["params"], ranks[0]["params"], rtol=0, atol=0)


@pytest.mark.parametrize("name,kind", [("spectral_gram_broken", "spectral"),
                                       ("spectral_gather_broken", "spectral"),
                                       ("mio_broken", "mio")])
def test_mis_scaled_backward_is_caught(dist_results, name, kind):
    """With the collectives' backwards in their classic wrong forms (no sum over ranks), the
    parity comparison above fails: for spectral the update is exactly 1/W of the right one."""
    init = [p.detach().clone() for p in _Net(0).parameters()]
    single = _train(kind, EQUAL, 0, ddp=False, steps=1)
    broken = _get(dist_results, name)[0]
    torch.testing.assert_close(torch.tensor(broken["loss"]), torch.tensor(single["loss"]), **TOL)
    right = [p - q for p, q in zip(single["params"], init)]
    wrong = [p - q for p, q in zip(broken["params"], init)]
    assert _max_diff(wrong, right) > 1e-3 * max(d.abs().max().item() for d in right)
    with pytest.raises(AssertionError):
        _assert_params(broken["params"], single["params"])
    if kind == "spectral":
        _assert_params(wrong, [d / W for d in right])


# --------------------------------------------------------------------------- tests: MINC + EMA
def test_minc_ddp_parity_moment_and_targets(dist_results):
    single = _train_minc(EQUAL, 0, ddp=False, gather=False)
    ranks = _get(dist_results, "minc")
    for step in range(len(single["loss"])):
        # Every rank holds the same M, bit for bit, equal to the single-process M.
        torch.testing.assert_close(ranks[1]["moment"][step], ranks[0]["moment"][step],
                                   rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["moment"][step], single["moment"][step], **TOL)
        # Each rank returns its local mean; with equal local sizes their mean is the global loss.
        mean = sum(ranks[r]["loss"][step] for r in range(W)) / W
        assert mean == pytest.approx(single["loss"][step], rel=1e-10, abs=1e-12)
    assert ranks[0]["loss"][0] != pytest.approx(ranks[1]["loss"][0])  # local, not global values
    for r in range(W):
        _assert_params(ranks[r]["params"], single["params"])
        _assert_params(ranks[r]["target"], single["target"])
    # EMA targets (MomentumEncoder after DDP steps) are bit-identical across ranks.
    _assert_params(ranks[1]["target"], ranks[0]["target"], rtol=0, atol=0)
    _assert_params(ranks[1]["params"], ranks[0]["params"], rtol=0, atol=0)


def test_minc_without_gather_has_rank_local_moments(dist_results):
    """The negative control: without the all-reduce the ranks' M differ and parity is lost."""
    ranks = _get(dist_results, "minc_local_moment")
    single = _train_minc(EQUAL, 0, ddp=False, gather=False, steps=1)
    assert _max_diff(ranks[0]["moment"], ranks[1]["moment"]) > 1e-3
    with pytest.raises(AssertionError):
        _assert_params(ranks[0]["params"], single["params"])


def test_minc_unequal_local_batches_documented_weighting(dist_results):
    """Unequal B_r: M is still the global moment, and DDP applies the gradient of the mean over
    ranks of the local means (documented), not the single-process gradient."""
    sizes = UNEQUAL
    ranks = _get(dist_results, "minc_unequal")
    torch.testing.assert_close(ranks[1]["moment"][0], ranks[0]["moment"][0], rtol=0, atol=0)
    # Emulate in one process: global M, then (1/W) Σ_r mean over rank r's rows.
    net = _Net(1, predictor=True)
    target = mk.MomentumEncoder(net.enc)
    loss_fn = mk.MINCLoss(K, moment_momentum=0.5, feature_norm="none")
    x1, x2 = _data(200, sum(sizes))
    p1, p2 = net(x1), net(x2)
    t1, t2 = target(x1), target(x2)
    loss_fn.update_moment([t2, t1])
    m = loss_fn.corrected_moment()
    torch.testing.assert_close(ranks[0]["moment"][0], m, **TOL)
    total, start = 0.0, 0
    for n in sizes:
        sl = slice(start, start + n)
        total = total + Fn.minc_loss(p1[sl], t2[sl], m) + Fn.minc_loss(p2[sl], t1[sl], m)
        start += n
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    (total / W).backward()
    opt.step()
    for r in range(W):
        _assert_params(ranks[r]["params"], list(net.parameters()))
    # ... which is not the full-batch single-process update.
    single = _train_minc(sizes, 0, ddp=False, gather=False, steps=1)
    assert _max_diff(ranks[0]["params"], single["params"]) > 1e-6


def test_ema_targets_with_batchnorm_buffers(dist_results):
    """Target parameters are identical across ranks; BN running stats are not (each rank's
    forward updates them from its local batch) unless synced with ``D.sync_buffers_``."""
    raw = _get(dist_results, "ema_bn_None")
    _assert_params(raw[1]["params"], raw[0]["params"], rtol=0, atol=0)
    assert _max_diff(raw[0]["buffers"], raw[1]["buffers"]) > 1e-3  # the pitfall is real
    mean = _get(dist_results, "ema_bn_mean")
    bcast = _get(dist_results, "ema_bn_broadcast")
    for synced in (mean, bcast):
        _assert_params(synced[1]["buffers"], synced[0]["buffers"], rtol=0, atol=0)
        _assert_params(synced[0]["params"], raw[0]["params"], rtol=0, atol=0)
    # The EMA is linear, so syncing by mean after every update equals the mean of the
    # unsynced per-rank targets; broadcasting gives rank 0's.
    avg = [(a + b) / 2 if a.is_floating_point() else a
           for a, b in zip(raw[0]["buffers"], raw[1]["buffers"])]
    _assert_params(mean[0]["buffers"], avg)
    _assert_params(bcast[0]["buffers"], raw[0]["buffers"], rtol=0, atol=0)


def test_sync_buffers_without_process_group():
    m = nn.BatchNorm1d(3)
    assert D.sync_buffers_(m) is m
    with pytest.raises(ValueError, match="op"):
        D.sync_buffers_(m, op="max")


F32_TOL = dict(rtol=2e-5, atol=1e-6)


def test_ddp_parity_triton_backend(dist_results):
    """float32, Triton kernels (interpreter) under DDP vs the single-process reference path."""
    f32 = torch.float32
    single = _train("spectral", EQUAL, 0, ddp=False, dtype=f32, backend="reference")
    for res in _get(dist_results, "spectral_gather_triton"):
        torch.testing.assert_close(torch.tensor(res["loss"]), torch.tensor(single["loss"]),
                                   **F32_TOL)
        _assert_params(res["params"], single["params"], **F32_TOL)
    single = _train_minc(EQUAL, 0, ddp=False, gather=False, steps=2, dtype=f32, backend="reference")
    ranks = _get(dist_results, "minc_triton")
    torch.testing.assert_close(ranks[1]["moment"][-1], ranks[0]["moment"][-1], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["moment"][-1], single["moment"][-1], **F32_TOL)
    for res in ranks:
        _assert_params(res["params"], single["params"], **F32_TOL)
        _assert_params(res["target"], single["target"], **F32_TOL)
