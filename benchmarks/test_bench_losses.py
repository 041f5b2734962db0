"""Microbenchmarks of one training step (forward + backward) of each loss, per provider.

``pytest benchmarks -m benchmark [--benchmark-json out.json]``.  On a GPU: bf16 at
B=4096, k ∈ {128, 2048}; on the CPU: fp32 at B=256, k=64 (eager and compile only).
The runner (``python -m benchmarks.run``) is the full, side-by-side version.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import cases
from benchmarks.run import minc_kernels_unavailable

from .conftest import sync

pytestmark = pytest.mark.benchmark

ON_GPU = torch.cuda.is_available()
SHAPES = [(4096, 128), (4096, 2048)] if ON_GPU else [(256, 64)]
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
_COMPILED = cases.CompiledCache()


@pytest.mark.parametrize("b,k", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("provider", ["eager", "compile", "minc_kernels"])
@pytest.mark.parametrize("loss", cases.LOSSES)
def test_loss_fwd_bwd(benchmark, bench_device, loss, provider, b, k):
    if provider == "minc_kernels":
        why = minc_kernels_unavailable(loss, bench_device, interpret=False)
        if why:
            pytest.skip(why)
    entry = cases.provider_entries(loss, (provider,))[0]  # spectral eager: pairwise
    if cases.algorithms(loss) and provider == "eager":
        entry = cases.ProviderEntry("eager", "eager", "auto")  # the loss's own choice
    inputs = cases.make_inputs(loss, b, k, DTYPE, bench_device)
    run = cases.mode_runner(cases.loss_fn(loss, entry, _COMPILED), inputs, "fwd+bwd")

    def step():
        run()
        sync(bench_device)

    step()  # compile / autotune outside the measurement
    benchmark.extra_info.update(loss=loss, provider=provider, B=b, k=k, dtype=str(DTYPE),
                                flops=cases.loss_flops(loss, entry.algorithm, b, k, "fwd+bwd",
                                                       cases.grad_in_forward(entry.family, loss)))
    benchmark(step)
