"""Microbenchmarks of one EMA step over the BYOL/MINC target network's tensors.

``pytest benchmarks -m benchmark``: ResNet-50 + projector on a GPU, ResNet-18 +
projector on the CPU; fp32 and bf16 online into fp32 targets; the Python loop,
``torch._foreach_lerp_`` and the compiled extension (skipped when it is not built).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import cases
from benchmarks.run import probe_extension

from .conftest import sync

pytestmark = pytest.mark.benchmark


@pytest.fixture(scope="module")
def extension_ok():
    return probe_extension()


@pytest.mark.parametrize("online", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["loop", "foreach", "minc_kernels"])
def test_ema_update(benchmark, bench_device, extension_ok, provider, online):
    if provider == "minc_kernels" and not extension_ok[0]:
        pytest.skip(f"extension unavailable: {extension_ok[1]}")
    model, shapes = cases.byol_target_shapes("resnet50" if bench_device.type == "cuda"
                                             else "resnet18")
    odt = cases.DTYPES[online]
    targets, onlines = cases.ema_tensors(shapes, odt, bench_device)
    fn = cases.ema_fn(provider, targets, onlines, momentum=0.996)

    def step():
        fn()
        sync(bench_device)

    step()
    n = sum(torch.Size(s).numel() for s in shapes)
    benchmark.extra_info.update(model=model, n_params=n, online=online,
                                bytes=n * cases.ema_bytes_per_param(odt))
    benchmark(step)
