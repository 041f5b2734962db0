"""The compiled extension minc_kernels._C: op minc_kernels::ema_update_ (CPU here, CUDA when a GPU is
there) against the docs/math.md §4 formula, every error path leaving all state unchanged, opcheck,
torch.compile, the build record and the ABI check."""
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import minc_kernels as mk
from minc_kernels import _ext

EXT = _ext.load()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"extension not built: {_ext.status()[1]}")
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ODD_SIZES = [1, 3, 0, 1023, 4097, 16385, 40000, (7, 13), (3, 5, 7), (0, 4)]


def _rand(shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def _oracle(t, o, momentum):
    """torch.lerp's formula in float64, rounded to the target dtype."""
    a, b, w = t.double(), o.double(), 1.0 - momentum
    out = a + w * (b - a) if w < 0.5 else b - (b - a) * (1.0 - w)
    return out.to(t.dtype)


def _max_err_ok(got, t, o, momentum, ulps=4):
    """|got - oracle| within a few ulps (of the target dtype) of max(|t|, |o|)."""
    eps = torch.finfo(got.dtype).eps
    want = _oracle(t, o, momentum).double()
    scale = torch.maximum(t.double().abs(), o.double().abs()) + torch.finfo(got.dtype).tiny
    return bool(((got.double() - want).abs() <= ulps * eps * scale).all())


def _snap(tensors):
    return [x.clone() for x in tensors]


def _unchanged(tensors, snap):
    return all(torch.equal(a, b) for a, b in zip(tensors, snap))


def _want_cuda_build() -> bool:
    """A CUDA build is expected unless CPU-only was requested or no toolkit/CUDA torch exists."""
    if os.environ.get("MINC_KERNELS_BUILD", "auto").lower() in ("cpu", "none"):
        return False
    if not torch.version.cuda:
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return (Path(home) / "bin" / "nvcc").exists()


# ------------------------------------------------------------------------------ the build
def test_extension_is_built():
    if EXT is None and os.environ.get("MINC_KERNELS_BUILD", "").lower() == "none":
        pytest.skip("MINC_KERNELS_BUILD=none: pure-Python install requested")
    assert EXT is not None, f"minc_kernels._C did not load: {_ext.status()[1]}"
    info = _ext.build_info()
    assert info["torch"] == torch.__version__
    assert set(info) >= {"torch", "torch_cuda", "cuda_compiled", "cuda_runtime", "cxx11_abi"}
    assert info["openmp"], "the CPU kernel must be compiled with OpenMP to use at::parallel_for"
    record = json.loads(_ext.BUILD_RECORD.read_text())
    assert record["torch"] == info["torch"] and record["cuda_compiled"] == info["cuda_compiled"]


@needs_ext
def test_cuda_objects_compiled_in_when_a_toolkit_is_there():
    info = _ext.build_info()
    if not _want_cuda_build():
        pytest.skip("CPU-only build requested or no CUDA toolkit / CUDA torch here")
    assert info["cuda_compiled"], f"built without CUDA although a toolkit is there: {info}"
    assert info["cuda_runtime"] and info["cuda_arch_list"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("minc_kernels::ema_update_.with_copy", "CUDA")
    so = Path(EXT.__file__).read_bytes()
    assert b".nv_fatbin" in so, "no CUDA fat binary section in the built module"


def test_abi_mismatch_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    record = tmp_path / "_C_build.json"
    record.write_text(json.dumps({"torch": "1.0.0+old", "cuda_compiled": False}))
    monkeypatch.setattr(_ext, "BUILD_RECORD", record)
    monkeypatch.setattr(_ext, "_state", {})
    assert _ext.load() is None
    ok, why = _ext.status()
    assert not ok and "built against torch 1.0.0+old" in why and torch.__version__ in why
    assert "pip install --no-build-isolation" in why
    with pytest.raises(RuntimeError, match="built against torch 1.0.0"):
        _ext.load(required=True)
    assert not _ext.supports("cpu")
    with pytest.raises(RuntimeError, match="extension is not available"):
        mk.ema_update_([torch.zeros(2)], [torch.ones(2)], 0.5, backend="extension")
    t = [torch.zeros(2)]
    mk.ema_update_(t, [torch.ones(2)], 0.5)  # auto: falls back to torch._foreach_lerp_
    assert torch.equal(t[0], torch.full((2,), 0.5))


# --------------------------------------------------------------------------- CPU results
@needs_ext
@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.5, 0.996, 1.0])
def test_many_odd_sizes_fp32_against_formula(momentum):
    t = [_rand(s, i) for i, s in enumerate(ODD_SIZES)]
    o = [_rand(s, 100 + i) for i, s in enumerate(ODD_SIZES)]
    t0 = _snap(t)
    version = t[3]._version
    torch.ops.minc_kernels.ema_update_(t, o, momentum)
    assert t[3]._version > version  # autograd sees the in-place write
    for got, a, b in zip(t, t0, o):
        assert got.dtype == torch.float32 and got.shape == a.shape
        assert _max_err_ok(got, a, b, momentum, ulps=2)
    ref = _snap(t0)
    torch._foreach_lerp_(ref, o, 1.0 - momentum)
    for got, want in zip(t, ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if momentum == 1.0:
        assert _unchanged(t, t0)
    if momentum == 0.0:
        assert _unchanged(t, o)


@needs_ext
@pytest.mark.parametrize("tdtype", FLOATS)
@pytest.mark.parametrize("odtype", FLOATS)
def test_every_dtype_pair(tdtype, odtype):
    sizes = [5, 1027, 33]
    t = [_rand(s, i, tdtype) for i, s in enumerate(sizes)]
    o = [_rand(s, 50 + i, odtype) for i, s in enumerate(sizes)]
    t0 = _snap(t)
    torch.ops.minc_kernels.ema_update_(t, o, 0.9)
    for got, a, b in zip(t, t0, o):
        assert got.dtype == tdtype
        assert _max_err_ok(got, a, b, 0.9, ulps=2), (tdtype, odtype)


@needs_ext
def test_bf16_online_into_fp32_target_keeps_small_updates():
    t = [_rand(4097, 1), _rand(1023, 2)]
    o = [_rand(4097, 3, torch.bfloat16), _rand(1023, 4, torch.bfloat16)]
    t0 = _snap(t)
    torch.ops.minc_kernels.ema_update_(t, o, 0.9999)
    for got, a, b in zip(t, t0, o):
        assert got.dtype == torch.float32
        assert _max_err_ok(got, a, b, 0.9999, ulps=2)
        assert not torch.equal(got, a)  # fp32 target: 1e-4 steps are not rounded away
    t = [_rand(8, 5)]
    o = [t[0].bfloat16()]
    torch.ops.minc_kernels.ema_update_(t, o, 0.0)
    assert torch.equal(t[0], o[0].float())


@needs_ext
def test_parallel_split_across_tensor_boundaries():
    """Threads get equal element ranges that start and end inside tensors."""
    sizes = [70001, 1, 32767, 32769, 99991, 5, 65536]
    old = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            t = [_rand(s, i) for i, s in enumerate(sizes)]
            o = [_rand(s, 20 + i, torch.bfloat16) for i, s in enumerate(sizes)]
            t0 = _snap(t)
            torch.ops.minc_kernels.ema_update_(t, o, 0.7)
            assert all(_max_err_ok(g, a, b, 0.7, ulps=2) for g, a, b in zip(t, t0, o))
    finally:
        torch.set_num_threads(old)


@needs_ext
def test_empty_lists_and_zero_size_tensors():
    torch.ops.minc_kernels.ema_update_([], [], 0.5)
    torch.ops.minc_kernels.ema_update_.with_copy([], [], 0.5, [], [])
    t, o = [torch.zeros(0), torch.zeros(3, 0)], [torch.ones(0), torch.ones(3, 0)]
    torch.ops.minc_kernels.ema_update_(t, o, 0.5)
    assert t[1].shape == (3, 0)


@needs_ext
def test_unaligned_views_and_channels_last():
    flat_t, flat_o = _rand(4200, 1), _rand(4200, 2, torch.bfloat16)
    t = [flat_t[1:1026], flat_t[1030:4127]]  # storage offsets: not 16-byte aligned
    o = [flat_o[3:1028], flat_o[1100:4197]]
    w = _rand((8, 3, 3, 5), 3).to(memory_format=torch.channels_last)
    wo = _rand((8, 3, 3, 5), 4).to(memory_format=torch.channels_last)
    t.append(w)
    o.append(wo)
    t0 = _snap(t)
    before = flat_t.clone()
    torch.ops.minc_kernels.ema_update_(t, o, 0.25)
    assert all(_max_err_ok(g, a, b, 0.25) for g, a, b in zip(t, t0, o))
    assert w.is_contiguous(memory_format=torch.channels_last)
    untouched = torch.ones(4200, dtype=torch.bool)
    untouched[1:1026] = False
    untouched[1030:4127] = False
    assert torch.equal(flat_t[untouched], before[untouched])  # nothing written outside


@needs_ext
def test_with_copy_lerps_and_copies_in_one_call():
    t = [_rand(3, 1), _rand(1025, 2)]
    o = [_rand(3, 3), _rand(1025, 4)]
    t0 = _snap(t)
    src = [torch.tensor(7, dtype=torch.long), torch.arange(17, dtype=torch.int8),
           torch.rand(33) > 0.5, _rand(1001, 5, torch.float16), torch.zeros(0, dtype=torch.long)]
    dst = [torch.zeros_like(s) for s in src]
    base = torch.zeros(40, dtype=torch.int8)  # an odd-offset destination
    dst.append(base[3:20])
    src.append(torch.arange(17, dtype=torch.int8) * 3)
    torch.ops.minc_kernels.ema_update_.with_copy(t, o, 0.5, dst, src)
    assert all(_max_err_ok(g, a, b, 0.5) for g, a, b in zip(t, t0, o))
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    assert torch.count_nonzero(base[:3]) == 0 and torch.count_nonzero(base[20:]) == 0


# ----------------------------------------------------------------------- bad calls (C++)
def _cases():
    f = lambda n, s=0, d=torch.float32: _rand(n, s, d)  # noqa: E731
    x = _rand(16, 7)
    return [
        ("count", lambda: ([f(3)], [f(3), f(3)], 0.5, [], []), ValueError, "same number"),
        ("copy count", lambda: ([f(3)], [f(3)], 0.5, [f(2)], []), ValueError, "same number"),
        ("shape", lambda: ([f(3), f(4)], [f(3), f(5)], 0.5, [], []), ValueError,
         r"online\[1\] must have the shape of target\[1\]: expected \[4\], got \[5\]"),
        ("int target", lambda: ([f(3), torch.zeros(3, dtype=torch.long)], [f(3), f(3)], 0.5, [], []),
         TypeError, r"target\[1\] must be a floating"),
        ("int online", lambda: ([f(3)], [torch.zeros(3, dtype=torch.int32)], 0.5, [], []),
         TypeError, r"online\[0\] must be a floating"),
        ("copy dtype", lambda: ([f(3)], [f(3)], 0.5, [torch.zeros(2, dtype=torch.long)],
                                [torch.zeros(2, dtype=torch.int32)]), TypeError, "dtype of copy_target"),
        ("momentum high", lambda: ([f(3)], [f(3)], 1.5, [], []), ValueError, "momentum"),
        ("momentum low", lambda: ([f(3)], [f(3)], -1e-3, [], []), ValueError, "momentum"),
        ("momentum nan", lambda: ([f(3)], [f(3)], float("nan"), [], []), ValueError, "momentum"),
        ("strided target", lambda: ([f(3), x[::2]], [f(3), f(8)], 0.5, [], []), ValueError, "dense"),
        ("strided online", lambda: ([f(3), f(8)], [f(3), x[::2]], 0.5, [], []), ValueError, "dense"),
        ("layouts differ", lambda: ([_rand((4, 5), 1).t()], [_rand((5, 4), 2)], 0.5, [], []),
         ValueError, "same strides"),
        ("same target twice", lambda: ([x, x], [f(16), f(16)], 0.5, [], []), ValueError, "share memory"),
        ("overlapping views", lambda: ([x[:10], x[6:]], [f(10), f(10)], 0.5, [], []), ValueError,
         "share memory"),
        ("copy over a target", lambda: ([x], [f(16)], 0.5, [x[4:8]], [f(4)]), ValueError, "share memory"),
        # crossed and partial target/online aliasing: the result would depend on the order
        ("crossed", lambda: ([x, f(16)], [f(16), x], 0.5, [], []), ValueError,
         r"target\[0\] \(written\) and online\[1\] \(read\) share memory"),
        ("partial self", lambda: ([x[:8]], [x[4:12]], 0.5, [], []), ValueError, "share memory"),
        ("self as bf16", lambda: ([x[:8]], [x.view(torch.bfloat16)[:8]], 0.5, [], []), ValueError,
         "share memory"),
        ("copy source is a target", lambda: ([x], [f(16)], 0.5, [torch.zeros(16)], [x]), ValueError,
         r"target\[0\] \(written\) and copy_source\[0\] \(read\)"),
        ("swapped order", lambda: ([nn.Parameter(f(3))], [f(3)], 0.5, [], []), ValueError,
         r"target\[0\] requires grad but online\[0\] does not.*swapped"),
        ("momentum 2-d tensor", lambda: ([f(3)], [f(3)], torch.ones(1, 1) / 2, [], []), ValueError, "0-dim"),
        ("momentum int tensor", lambda: ([f(3)], [f(3)], torch.tensor(0), [], []), TypeError,
         "float32 or float64"),
        ("momentum tensor high", lambda: ([f(3)], [f(3)], torch.tensor(1.01, dtype=torch.float64), [], []),
         ValueError, r"momentum must be in \[0, 1\], got 1.01"),
    ]


@needs_ext
@pytest.mark.parametrize("name,make,exc,match", _cases(), ids=[c[0] for c in _cases()])
def test_bad_calls_raise_and_leave_everything_unchanged(name, make, exc, match):
    targets, onlines, m, copy_t, copy_s = make()
    if len(targets) == len(onlines):  # one more valid pair after the bad one: untouched too
        targets, onlines = targets + [_rand(9, 11)], onlines + [_rand(9, 12)]
    written = targets + copy_t
    snap = _snap(written)
    op = torch.ops.minc_kernels.ema_update_
    call = op.tensor_momentum if isinstance(m, torch.Tensor) else op.with_copy
    with pytest.raises(exc, match=match):
        call(targets, onlines, m, copy_t, copy_s)
    assert _unchanged(written, snap)
    if not isinstance(m, torch.Tensor):
        with pytest.raises(exc):  # the pybind entry point goes through the same op
            EXT.ema_update_(targets, onlines, m, copy_t, copy_s)
        assert _unchanged(written, snap)


@needs_ext
def test_python_api_rejects_non_dense_before_the_extension():
    x = _rand(16, 1)
    t = [_rand(4, 2), x[::2]]
    snap = _snap(t)
    with pytest.raises(ValueError, match="dense"):
        mk.ema_update_(t, [_rand(4, 3), _rand(8, 4)], 0.5, backend="extension")
    assert _unchanged(t, snap)


# ----------------------------------------------------------------- torch.library / compile
@needs_ext
def test_opcheck():
    t = [_rand(5, 1), _rand((3, 7), 2), _rand(1025, 3)]
    o = [_rand(5, 4), _rand((3, 7), 5, torch.bfloat16), _rand(1025, 6)]
    ct, cs = [torch.zeros(3, dtype=torch.long)], [torch.arange(3)]
    torch.library.opcheck(torch.ops.minc_kernels.ema_update_.with_copy, (t, o, 0.9, ct, cs))
    torch.library.opcheck(torch.ops.minc_kernels.ema_update_.default, (t, o, 0.9))
    for m in (torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.25)):
        torch.library.opcheck(torch.ops.minc_kernels.ema_update_.tensor_momentum, (t, o, m, ct, cs))


@needs_ext
def test_torch_compile_fullgraph_calls_the_op():
    t = [_rand(33, 1), _rand((4, 5), 2)]
    o = [_rand(33, 3), _rand((4, 5), 4)]
    want = _snap(t)
    mk.ema_update_(want, o, 0.8, backend="extension")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(targets, onlines):
        mk.ema_update_(targets, onlines, 0.8, check_finite=False, backend="extension")

    step(t, o)
    assert all(torch.equal(a, b) for a, b in zip(t, want))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@needs_ext
@pytest.mark.parametrize("ema_buffers", [True, False])
def test_momentum_encoder_updates_everything_in_one_call(ema_buffers):
    online = _net()
    fused = mk.MomentumEncoder(online, ema_buffers=ema_buffers)
    plain = mk.MomentumEncoder(online, ema_buffers=ema_buffers)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.5)
    online.train()
    online(torch.randn(16, 4))
    with _OpLog() as log:
        fused.update(0.9, check_finite=False, backend="extension")
    assert log.ops == ["minc_kernels.ema_update_.with_copy"], log.ops
    plain.update(0.9, backend="foreach")
    for a, b in zip(fused.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused.target[1].num_batches_tracked, online[1].num_batches_tracked)
    if not ema_buffers:
        assert torch.equal(fused.target[1].running_var, online[1].running_var)


# --------------------------------------------------------------------------------- GPU
def _cuda_ok():
    if not _ext.supports("cuda"):
        pytest.fail(f"extension built without CUDA kernels: {_ext.build_info()}")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("odtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_many_tensors_against_foreach(odtype):
    _cuda_ok()
    sizes = [1, 3, 0, 1023, 4097, 16384, 16385, 1 << 20, 3_000_001] + [((i * 37) % 900) + 1 for i in range(300)]
    t = [_rand(s, i, device="cuda") for i, s in enumerate(sizes)]  # > 128 tensors: several launches
    o = [_rand(s, 1000 + i, odtype, "cuda") for i, s in enumerate(sizes)]
    t0 = _snap(t)
    ref = _snap(t)
    torch._foreach_lerp_(ref, [x.float() for x in o], 1 - 0.99)
    torch.ops.minc_kernels.ema_update_(t, o, 0.99)
    for got, want, a, b in zip(t, ref, t0, o):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert _max_err_ok(got.cpu(), a.cpu(), b.cpu(), 0.99, ulps=2)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("tdtype", FLOATS)
@pytest.mark.parametrize("odtype", FLOATS)
def test_cuda_every_dtype_pair_and_unaligned(tdtype, odtype):
    _cuda_ok()
    flat_t, flat_o = _rand(20000, 1, tdtype, "cuda"), _rand(20000, 2, odtype, "cuda")
    t = [flat_t[1:4098], flat_t[5000:19999], _rand(17, 3, tdtype, "cuda")]
    o = [flat_o[2:4099], flat_o[3:15002], _rand(17, 4, odtype, "cuda")]
    t0 = [x.cpu() for x in t]
    keep = flat_t.clone()
    torch.ops.minc_kernels.ema_update_(t, o, 0.6)
    for got, a, b in zip(t, t0, o):
        assert _max_err_ok(got.cpu(), a, b.cpu(), 0.6, ulps=2)
    assert torch.equal(flat_t[4098:5000], keep[4098:5000]) and flat_t[0] == keep[0]
    assert flat_t[19999] == keep[19999]


@pytest.mark.gpu
@needs_ext
def test_cuda_copy_momentum_ends_stream_and_errors():
    _cuda_ok()
    t = [_rand(1000, 1, device="cuda"), _rand(7, 2, device="cuda")]
    o = [_rand(1000, 3, torch.bfloat16, "cuda"), _rand(7, 4, device="cuda")]
    t0 = _snap(t)
    torch.ops.minc_kernels.ema_update_(t, o, 1.0)
    assert _unchanged(t, t0)
    torch.ops.minc_kernels.ema_update_(t, o, 0.0)
    assert all(torch.equal(a, b.float()) for a, b in zip(t, o))
    src = [torch.arange(100001, dtype=torch.int8, device="cuda"), torch.tensor(5, device="cuda")]
    dst = [torch.zeros_like(s) for s in src]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # runs on the current stream
        torch.ops.minc_kernels.ema_update_.with_copy(t, o, 0.5, dst, src)
    side.synchronize()
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    snap = _snap(t)
    with pytest.raises(ValueError, match="device"):
        torch.ops.minc_kernels.ema_update_.with_copy(t, o, 0.5, [torch.zeros(2)], [torch.zeros(2)])
    with pytest.raises(ValueError, match="share memory"):
        torch.ops.minc_kernels.ema_update_([t[0], t[0]], [o[0], o[0]], 0.5)
    assert _unchanged(t, snap)
    torch.library.opcheck(torch.ops.minc_kernels.ema_update_.with_copy, (t, o, 0.9, dst, src))


@pytest.mark.gpu
@needs_ext
def test_cuda_device_guard_on_second_gpu():
    _cuda_ok()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    t, o = [_rand(5000, 1, device="cuda:1")], [_rand(5000, 2, device="cuda:1")]
    t0 = _snap(t)
    with torch.cuda.device(0):
        torch.ops.minc_kernels.ema_update_(t, o, 0.5)
    assert _max_err_ok(t[0].cpu(), t0[0].cpu(), o[0].cpu(), 0.5)


@pytest.mark.gpu
@needs_ext
def test_cuda_momentum_encoder_resnet_like():
    _cuda_ok()
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                           nn.LazyLinear(10)).cuda()
    online(torch.randn(2, 3, 8, 8, device="cuda"))
    online = online.to(memory_format=torch.channels_last)
    a, b = mk.MomentumEncoder(online), mk.MomentumEncoder(online)
    with torch.no_grad():
        for p in online.parameters():
            p.mul_(1.5)
    a.update(0.99, backend="extension")
    b.update(0.99, backend="foreach")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@needs_ext
def test_auto_on_cpu_picks_the_extension_for_same_and_mixed_dtypes():
    """The measured choice (benchmarks/results/cpu-overhead-*): one extension call, with its
    checks in C++, for same-dtype pairs as for bf16 online into fp32 targets; no Python-side
    per-tensor work and no torch._foreach_lerp_."""
    t = [_rand(33, 1), _rand((4, 5), 2)]
    same, mixed = [_rand(33, 3), _rand((4, 5), 4)], [_rand(33, 3, torch.bfloat16), _rand((4, 5), 4)]
    for online in (same, mixed):
        with _OpLog() as log:
            mk.ema_update_(t, online, 0.9)
        assert log.ops == ["minc_kernels.ema_update_.with_copy"], log.ops


@needs_ext
def test_auto_hot_path_errors_still_name_the_tensor():
    """The hot path leaves every check to the op (C++, or the fake kernel for meta tensors):
    the errors must still name the argument, and nothing may be written."""
    t = [torch.zeros(3), torch.zeros(2, 2)]
    cases = [
        ([torch.ones(3), torch.ones(4)], ValueError, r"online\[1\].*shape"),
        ([torch.ones(3), "x"], TypeError, r"online\[1\].*tensor"),
        ([torch.ones(3), torch.ones(2, 2, dtype=torch.int64)], TypeError, r"online\[1\].*floating"),
        ([torch.ones(3), torch.ones(2, 2, device="meta")], ValueError, r"device"),
        ([torch.ones(3), torch.ones(4, 4)[::2, ::2]], ValueError, r"online\[1\].*strides"),
    ]
    for online, exc, match in cases:
        with pytest.raises(exc, match=match):
            mk.ema_update_(t, online, 0.5)
        assert all(bool((x == 0).all()) for x in t), "a refused call wrote a target"
    with pytest.raises(ValueError, match=r"share memory"):
        buf = torch.zeros(4)
        mk.ema_update_([buf[:2], buf[1:3]], [torch.ones(2), torch.ones(2)], 0.5)


# ------------------------------------------------------- check order (issue 25), statically too
@needs_ext
@pytest.mark.parametrize("overload", ["with_copy", "tensor_momentum"])
def test_cpu_kernel_refuses_other_devices_before_any_pointer(overload):
    """The GPU run crashed (exit 139) on CUDA targets with CPU tensors in the copy lists.
    Here the CPU kernel itself is called (redispatch, below the fake's dispatch) with meta
    tensors, whose data pointer is null: any pointer use before the device checks would
    crash this process; the checks must raise a ValueError naming the tensors first."""
    from torch._C import DispatchKey, DispatchKeySet

    op = getattr(torch.ops.minc_kernels.ema_update_, overload)
    m = 0.5 if overload == "with_copy" else torch.tensor(0.5, dtype=torch.float64)
    cpu_only = DispatchKeySet(DispatchKey.CPU)
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    t, o = [_rand(4, 1), _rand(3, 2)], [_rand(4, 3), _rand(3, 4)]
    snap = _snap(t)
    cases = [
        ((t, o, m, [torch.zeros(2)], [meta(2)]), r"copy_target\[0\] \(cpu\) and copy_source\[0\] \(meta\)"),
        ((t, o, m, [meta(2)], [meta(2)]), r"copy_target\[0\] \(meta\)"),
        ((t, [o[0], meta(3)], m, [], []), r"online\[1\] \(meta\)"),
        (([meta(4)], [meta(4)], m, [], []), "CPU or a CUDA device, got meta"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            op.redispatch(cpu_only, *args)
        assert _unchanged(t, snap)


def _function_body(src: str, signature: str) -> str:
    start = src.index(signature)
    brace = src.index("{", start)
    depth, i = 0, brace
    while True:
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        if depth == 0:
            return src[brace:i + 1]
        i += 1


def test_kernels_check_every_argument_before_any_pointer_statically():
    """The static half of the check-order proof.  Every kernel entry point (CPU and CUDA,
    all in ema.cpp, compiled by the host compiler) starts with check_ema_args and only then
    calls the kernel proper (run_cpu in ema.cpp, run_cuda in ema_cuda.cu, where every
    data_ptr() of the kernels is); ema_cuda.cu registers nothing and checks no argument;
    inside check_ema_args the devices come first and the data pointers (aliasing) last."""
    import re

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    strip = lambda text: re.sub(r"//[^\n]*", "", text)  # noqa: E731 - code, not comments
    cpp, cu = strip((csrc / "ema.cpp").read_text()), strip((csrc / "ema_cuda.cu").read_text())
    for run, entries in (("run_cpu(", ("void ema_update_cpu(", "void ema_update_cpu_tensor(")),
                         ("run_cuda(", ("void ema_update_cuda(", "void ema_update_cuda_tensor("))):
        for entry in entries:
            body = _function_body(cpp, entry)
            first = body[1:].strip().split(";")[0]
            assert "check_ema_args(" in first, (entry, first)
            assert run in body and body.index("check_ema_args(") < body.index(run)
            assert "data_ptr" not in body
    assert cpp.count("run_cpu(") == 3 and cpp.count("run_cuda(") == 2  # defined/called 1+2, 0+2
    assert cu.count("run_cuda(") == 1 and "TORCH_LIBRARY" not in cu and "check_ema_args" not in cu
    assert "TORCH_CHECK_VALUE" not in cu and "TORCH_CHECK_TYPE" not in cu
    # every data pointer is read inside a kernel proper or the checks' last step
    for src, fns in ((cpp, ("void run_cpu(", "void add_spans(", "double read_cpu_scalar(",
                            "EmaMomentum check_ema_args(")),  # (the last: checked below)
                     (cu, ("void run_cuda(",))):
        rest = src
        for fn in fns:
            rest = rest.replace(_function_body(rest, fn), "{}")
        assert "data_ptr" not in rest, "a data pointer read outside the checked kernels"
    checks = _function_body(cpp, "EmaMomentum check_ema_args(")
    order = [checks.index(s) for s in ("check_devices(target", "check_devices(copy_target",
                                       "read_cpu_scalar(", "check_pairs(target", "check_aliasing(")]
    assert order == sorted(order), order
    aliasing = _function_body(cpp, "void check_aliasing(")
    assert "add_spans(" in aliasing
    # the one pointer check_ema_args takes itself: the momentum tensor's, after its checks
    assert "data_ptr" not in checks.replace("mt->const_data_ptr()", "")
    assert checks.index("mt->is_cpu() ||") < checks.index("mt->const_data_ptr()")


# -------------------------------------------------------------------- compile (issue 23)
@needs_ext
def test_first_compiled_update_in_a_fresh_process_loads_the_extension():
    """No load before compile: the first ema_update_ of the process runs under
    fullgraph=True (the extension is loaded at trace time, its answer a constant)."""
    import subprocess
    import sys

    code = (
        "import torch, torch._dynamo.testing as T\n"
        "import minc_kernels as mk\n"
        "from minc_kernels import _ext\n"
        "assert 'module' not in _ext._state\n"
        "t, o = [torch.zeros(4)], [torch.ones(4)]\n"
        "cnt = T.CompileCounter()\n"
        "f = torch.compile(lambda m: mk.ema_update_(t, o, m, backend='extension'), backend=cnt, fullgraph=True)\n"
        "f(torch.tensor(0.75, dtype=torch.float64))\n"
        "assert torch.equal(t[0], torch.full((4,), 0.25)), t\n"
        "assert cnt.frame_count == 1 and _ext._state['module'] is not None\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@needs_ext
def test_aot_eager_schedule_does_not_recompile():
    """aot_eager (functionalized, the op through its fake): one graph for 20 scheduled steps,
    a recompile would raise; the values equal the eager float-momentum updates."""
    import torch._dynamo.testing as dynamo_testing
    from torch._dynamo.utils import counters

    t, o = [_rand(33, 1), _rand((4, 5), 2)], [_rand(33, 3, torch.bfloat16), _rand((4, 5), 4)]
    want = _snap(t)
    for s in range(20):
        mk.ema_update_(want, o, mk.cosine_momentum(s, 20))
    torch._dynamo.reset()
    counters.clear()
    counter = dynamo_testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda m: mk.ema_update_(t, o, m), backend=counter, fullgraph=True)
    momentum = torch.zeros((), dtype=torch.float64)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in range(20):
            momentum.fill_(mk.cosine_momentum(s, 20))
            step(momentum)
    assert counters["stats"]["unique_graphs"] == 1
    assert all(torch.equal(a, b) for a, b in zip(t, want))


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("backend", ["extension", "foreach"])
def test_cuda_tensor_momentum_on_the_device_without_a_sync(backend):
    """A momentum tensor on the GPU is read by the kernel: the same bits as the float path,
    no host sync (sync debug mode "error"), one graph for a compiled schedule."""
    _cuda_ok()
    sizes = [1, 1023, 4097, 16385]
    t = [_rand(s, i, device="cuda") for i, s in enumerate(sizes)]
    o = [_rand(s, 10 + i, torch.bfloat16, "cuda") for i, s in enumerate(sizes)]
    for m in (torch.tensor(0.99, dtype=torch.float64, device="cuda"),
              torch.tensor(0.3, device="cuda"), torch.tensor(0.7, dtype=torch.float64)):
        a, b = _snap(t), _snap(t)
        old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            mk.ema_update_(a, o, m, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode(old)
        mk.ema_update_(b, o, float(m.cpu()), backend=backend)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), (backend, m)
    with pytest.raises(ValueError, match="momentum tensor must be on the CPU or on the device"):
        mk.ema_update_([torch.zeros(3)], [torch.ones(3)], torch.tensor(0.5, device="cuda"),
                       backend=backend)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):  # opt-in read
        mk.ema_update_(t, o, torch.tensor(1.5, device="cuda"), check_finite=True, backend=backend)
    import torch._dynamo.testing as dynamo_testing

    torch._dynamo.reset()
    counter = dynamo_testing.CompileCounter()
    step = torch.compile(lambda m: mk.ema_update_(t, o, m, backend=backend), backend=counter,
                         fullgraph=True)
    momentum = torch.zeros((), dtype=torch.float64, device="cuda")
    for s in range(20):
        momentum.fill_(mk.cosine_momentum(s, 20))
        step(momentum)
    assert counter.frame_count == 1
