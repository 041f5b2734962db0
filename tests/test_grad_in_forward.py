"""The one autograd wiring of the fused-gradient ops (ops/_grad_in_forward.py), on every op
that uses it: backward scales the forward's gradient; double backward raises."""
import pytest
import torch

pytest.importorskip("triton")

from minc_kernels import reference  # noqa: E402
from minc_kernels.ops.mio_cpu import mio_loss_blocked  # noqa: E402


def _dispatched_ops():
    """A dispatch mode that records every op it sees in ``.names`` (the profiler misses
    custom ops that have no autograd registered, e.g. minc_moment_sum)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    return Ops()


def _ops():
    from minc_kernels.ops import minc, mio, spectral
    m = torch.eye(6) * 0.5
    return {
        "spectral": (lambda a, b: spectral.spectral_loss(a, b, 1.0, True, "gram"),
                     lambda a, b: reference.spectral_loss(a, b, algorithm="gram"), (0, 1)),
        "minc": (lambda a, b: minc.minc_loss(a, b, m, "standard"),
                 lambda a, b: reference.minc_loss(a, b, m), (0,)),
        "mio": (lambda a, b: mio.mio_loss(a, b, 0.5, 0.5, 1.0),
                lambda a, b: reference.mio_loss(a, b), (0, 1)),
        "mio_blocked": (lambda a, b: mio_loss_blocked(a, b), lambda a, b: reference.mio_loss(a, b), (0, 1)),
    }


@pytest.mark.parametrize("name", ["spectral", "minc", "mio", "mio_blocked"])
def test_backward_scales_the_forward_gradient(name, kernel_device):
    if kernel_device.type == "cpu" and name != "mio_blocked":
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    fn, ref, grad_args = _ops()[name]
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(5, 6, generator=g) * 0.4).to(kernel_device)
    b = (torch.randn(5, 6, generator=g) * 0.4).to(kernel_device)
    got_in = [a.clone().requires_grad_(0 in grad_args), b.clone().requires_grad_(1 in grad_args)]
    want_in = [a.clone().requires_grad_(0 in grad_args), b.clone().requires_grad_(1 in grad_args)]
    scale = torch.tensor(-1.7, device=kernel_device)
    (fn(*got_in) * scale).backward()
    (ref(*want_in) * scale).backward()
    for i in grad_args:
        torch.testing.assert_close(got_in[i].grad, want_in[i].grad, rtol=1e-5, atol=1e-6)
    # double backward would be silently zero through the saved gradient: it raises
    x = [a.clone().requires_grad_(0 in grad_args), b.clone().requires_grad_(1 in grad_args)]
    loss = fn(*x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [x[i] for i in grad_args], create_graph=True)


@pytest.mark.parametrize("name", ["mio_blocked", "spectral", "minc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("wanted", ["both", "first"])
def test_backward_is_one_op_per_buffer_with_the_bits_of_scale_then_cast(name, dtype, wanted,
                                                                         kernel_device):
    """Backward scales the saved fp32 gradient and rounds it to the input's dtype in one op
    (``mul`` into a buffer of that dtype: one kernel, not a multiply and a cast), with the
    bits of ``(grad_loss * g).to(dtype)``.  The stacked layout (MIO) scales both halves in
    one op when both inputs want a gradient."""
    import os
    if (kernel_device.type == "cpu" and name != "mio_blocked"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    if name == "minc" and wanted == "first":
        pytest.skip("MINC's op has one gradient input")
    call, args = _calls()[name]
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(7, 6, generator=g) * 0.4).to(kernel_device, dtype)
    b = (torch.randn(7, 6, generator=g) * 0.4).to(kernel_device, dtype)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_(wanted == "both")
    out = call(*args(x, y, True))
    scale = torch.tensor(-1.3, device=kernel_device)
    with _dispatched_ops() as seen:
        torch.autograd.backward(out[0], scale)
    saved = out[1:] if len(out) > 2 or name == "minc" else (out[1][:7], out[1][7:])
    got = [x.grad, y.grad]
    for i, s in enumerate(saved):
        want = (scale * s).to(dtype)
        if got[i] is None:
            assert i == 1 and (wanted == "first" or name == "minc")
            continue
        assert got[i].dtype == dtype
        assert torch.equal(got[i], want), (name, i)
    muls = [n for n in seen.names if n.startswith("aten.mul")]
    n_grads = sum(t is not None for t in got)
    one_buffer = name == "mio_blocked" and n_grads == 2
    assert len(muls) == (1 if one_buffer else n_grads), seen.names
    assert not any("_to_copy" in n for n in seen.names), seen.names


def test_host_helpers_match_triton():
    """ops/_common's plain-Python cdiv/next_pow2 (host overhead) agree with triton's."""
    import triton

    from minc_kernels.ops._common import cdiv, next_pow2
    for a in range(0, 2100, 7):
        assert next_pow2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def _calls():
    from minc_kernels.ops import barlow_twins, minc, mio, mio_cpu, spectral, vicreg
    m = torch.eye(6) * 0.5
    return {
        "spectral": (spectral._spectral_loss, lambda a, b, ng: (a, b, 1.0, True, "gram", ng)),
        "minc": (minc._minc_loss, lambda a, b, ng: (a, b.detach(), m, False, ng)),
        "mio": (mio._mio_loss, lambda a, b, ng: (a, b, 0.5, 0.5, 1.0, ng)),
        "mio_blocked": (mio_cpu._mio_loss_blocked, lambda a, b, ng: (a, b, 0.5, 0.5, 1.0, ng, 0, 0)),
        "barlow_twins": (barlow_twins._barlow_twins_loss,
                         lambda a, b, ng: (a, b, 5e-3, "pairwise", ng)),
        "vicreg": (vicreg._vicreg_loss, lambda a, b, ng: (a, b, 25.0, 25.0, 1.0, 1e-4, "gram", ng)),
    }


def _op_events(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("minc_kernels::")]


@pytest.mark.parametrize("name", ["spectral", "minc", "mio", "mio_blocked", "barlow_twins", "vicreg"])
def test_eager_calls_skip_the_custom_op_with_the_same_bits(name, kernel_device):
    """In eager mode the API runs the op's body under an autograd.Function (no custom-op
    dispatch: host time); its loss and gradients are bit for bit the op's."""
    import os
    if kernel_device.type == "cpu" and name != "mio_blocked" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    call, args = _calls()[name]
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(7, 6, generator=g) * 0.4).to(kernel_device)
    b = (torch.randn(7, 6, generator=g) * 0.4).to(kernel_device)
    outs = {}
    for path, fn in (("eager", call), ("op", call.op)):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        events = _op_events(lambda: fn(*args(x, y, True))[0].mul(-1.3).backward())
        assert (events == []) == (path == "eager"), (path, events)
        outs[path] = (fn(*args(a, b, False))[0], x.grad, y.grad)
    for e, o in zip(outs["eager"], outs["op"]):
        if o is None:
            assert e is None
        else:
            torch.testing.assert_close(e, o, rtol=0, atol=0)


def test_compiled_calls_trace_the_custom_op():
    """Under torch.compile the callable hands TorchDynamo the op (traced through its fake, one
    graph), not the autograd.Function running Triton launchers; values as in eager."""
    from minc_kernels.ops import mio_cpu
    call = mio_cpu._mio_loss_blocked
    seen = []
    torch._dynamo.reset()

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    f = torch.compile(lambda a, b: call(a, b, 0.5, 0.5, 1.0, False, 0, 0)[0], fullgraph=True,
                      backend=backend)
    a, b = torch.randn(7, 6), torch.randn(7, 6)
    torch.testing.assert_close(f(a, b), call(a, b, 0.5, 0.5, 1.0, False, 0, 0)[0])
    assert any("mio_loss_blocked_fwd" in s for s in seen), seen


@pytest.mark.parametrize("path", ["functional", "module"])
def test_default_training_calls_enter_no_custom_op(path, kernel_device):
    """Every loss with kernels, fwd+bwd through the public API as a training loop calls it
    (the registry's ``step``, MINC's with its batch moment, and the module, MINCLoss's with
    its moment update): in eager mode no ``minc_kernels::`` op is dispatched (each one costs
    tens of µs of host time; benchmarks/cpu_host_overhead.py)."""
    import os
    if kernel_device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from benchmarks.cpu_host_overhead import call_fn, make_inputs
    from minc_kernels.losses import REGISTRY

    checked = []
    for name, spec in REGISTRY.items():
        if spec.op is None:
            continue
        inputs = [x.detach().to(kernel_device).requires_grad_(x.requires_grad)
                  for x in make_inputs(spec, 9, 6, torch.float32)]
        fn = call_fn(spec, path, 6, "triton")
        if path == "module":
            fn = fn.to(kernel_device)
        with _dispatched_ops() as seen:
            fn(*inputs).backward()
        assert any(n.startswith("aten.") for n in seen.names), name  # the mode saw the call
        mine = [n for n in seen.names if n.startswith("minc_kernels.")]
        assert mine == [], (name, mine)
        assert all(x.grad is not None for x in inputs if x.requires_grad), name
        checked.append(name)
    assert {"spectral", "minc", "mio"} <= set(checked), checked
