"""The one autograd wiring of the fused-gradient ops (ops/_grad_in_forward.py), on every op
that uses it: backward scales the forward's gradient; double backward raises."""
import pytest
import torch

pytest.importorskip("triton")

from minc_kernels import reference  # noqa: E402
from minc_kernels.ops.mio_cpu import mio_loss_blocked  # noqa: E402


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


def test_host_helpers_match_triton():
    """ops/_common's plain-Python cdiv/next_pow2 (host overhead) agree with triton's."""
    import triton

    from minc_kernels.ops._common import cdiv, next_pow2
    for a in range(0, 2100, 7):
        assert next_pow2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
