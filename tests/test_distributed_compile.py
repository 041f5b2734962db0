"""The distributed losses under torch.compile(fullgraph=True) on 2 gloo ranks (issue 23):
the size exchange runs in its static-size mode, and each compiled step matches eager."""
from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist

import minc_kernels as mk
from dist_helpers import free_port, spawn

if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

W, B, K = 2, 4, 6
CASES = {
    "spectral-auto": lambda: mk.SpectralContrastiveLoss(mu=0.5, gather_distributed=True),
    "spectral-gather": lambda: mk.SpectralContrastiveLoss(mu=0.5, gather_distributed=True,
                                                          dist_comm="gather"),
    "spectral-gram": lambda: mk.SpectralContrastiveLoss(mu=0.5, gather_distributed=True,
                                                        dist_comm="gram"),
    "mio": lambda: mk.MIOLoss(gather_distributed=True),
    "minc": lambda: mk.MINCLoss(K, gather_distributed=True),
}


def _views(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)


def _worker(rank, port, out_dir):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=W)
        results = {}
        for name, make in CASES.items():
            torch._dynamo.reset()
            eager_loss, compiled_loss = make(), make()
            step = torch.compile(compiled_loss, fullgraph=True, backend="aot_eager")
            per_step = []
            for i in range(2):
                a, b = _views(rank + 10 * i)
                ea, eb = a.clone().requires_grad_(), b.clone().requires_grad_()
                ca, cb = a.clone().requires_grad_(), b.clone().requires_grad_()
                e = eager_loss(ea, eb)
                e.backward()
                c = step(ca, cb)
                c.backward()
                per_step.append((e.detach(), c.detach(), ea.grad, ca.grad,
                                 eb.grad if eb.grad is not None else torch.zeros(()),
                                 cb.grad if cb.grad is not None else torch.zeros(())))
            results[name] = per_step
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def compiled_results():
    with tempfile.TemporaryDirectory() as d:
        spawn(_worker, (free_port(), d), nprocs=W, timeout_s=600)
        errs = [open(os.path.join(d, f)).read() for f in sorted(os.listdir(d)) if f.endswith(".err")]
        assert not errs, "\n".join(errs)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(W)]


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compiled_distributed_loss_matches_eager(compiled_results, name):
    for rank_results in compiled_results:
        for e, c, ega, cga, egb, cgb in rank_results[name]:
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cga, ega, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cgb, egb, rtol=1e-5, atol=1e-6)
