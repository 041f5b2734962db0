"""Bad input (docs/math.md §6) on every public function, and backend selection."""
import pytest
import torch

import minc_kernels as mk
from minc_kernels import _backend
from minc_kernels import functional as Fn
from minc_kernels import reference as R

PAIR_LOSSES = [
    pytest.param(lambda a, b: Fn.spectral_contrastive_loss(a, b), id="spectral"),
    pytest.param(lambda a, b: Fn.mio_loss(a, b), id="mio"),
    pytest.param(lambda a, b: Fn.minc_loss(a, b, torch.eye(3)), id="minc"),
]


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_wrong_rank(loss):
    with pytest.raises(ValueError, match=r"z1|p.*\(B, k\)"):
        loss(torch.randn(4, 3, 2), torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        loss(torch.randn(4), torch.randn(4))


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_shape_mismatch_names_argument_and_expected_shape(loss):
    with pytest.raises(ValueError, match=r"(z2|t) must have the same shape .*\(4, 3\).*\(5, 3\)"):
        loss(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_integer_tensors(loss):
    with pytest.raises(TypeError, match="floating"):
        loss(torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long))


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_mixed_dtypes(loss):
    with pytest.raises(TypeError, match="same dtype"):
        loss(torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_mixed_devices(loss):
    with pytest.raises(ValueError, match="same device"):
        loss(torch.randn(4, 3), torch.randn(4, 3, device="meta"))


@pytest.mark.parametrize("fn", [Fn.spectral_contrastive_loss, Fn.mio_loss])
def test_batch_below_minimum(fn):
    with pytest.raises(ValueError, match="B >= 2"):
        fn(torch.randn(1, 3), torch.randn(1, 3))
    fn(torch.randn(2, 3), torch.randn(2, 3))  # B = 2 is fine


def test_not_a_tensor():
    with pytest.raises(TypeError, match="z1 must be a torch.Tensor"):
        Fn.spectral_contrastive_loss([[1.0, 2.0]], torch.randn(1, 2))


def test_wrong_size_moment():
    with pytest.raises(ValueError, match=r"moment must have shape \(3, 3\)"):
        Fn.minc_loss(torch.randn(4, 3), torch.randn(4, 3), torch.eye(4))
    with pytest.raises(ValueError, match=r"moment must have shape \(3, 3\)"):
        Fn.minc_loss(torch.randn(4, 3), torch.randn(4, 3), torch.ones(3))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda a, b: Fn.spectral_contrastive_loss(a, b, mu=0.0), "mu"),
        (lambda a, b: Fn.spectral_contrastive_loss(a, b, algorithm="fft"), "algorithm"),
        (lambda a, b: Fn.mio_loss(a, b, pos_temperature=-1), "pos_temperature"),
        (lambda a, b: Fn.mio_loss(a, b, neg_temperature=float("nan")), "neg_temperature"),
        (lambda a, b: Fn.mio_loss(a, b, lambda_l2=-0.1), "lambda_l2"),
        (lambda a, b: Fn.minc_loss(a, b, torch.eye(3), ordering="sorted"), "ordering"),
        (lambda a, b: Fn.spectral_contrastive_loss(a, b, backend="cuda"), "backend"),
    ],
)
def test_bad_hyper_parameters(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(4, 3), torch.randn(4, 3))


def test_bad_backend_env_var(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=_backend.ENV_VAR):
        Fn.spectral_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3))


def test_auto_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x = torch.randn(4, 3)
    assert _backend.resolve("auto", "spectral", x) is None
    assert _backend.resolve("reference", "spectral", x) is None
    assert _backend.resolve(None, "spectral", x.double()) is None


def test_explicit_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        Fn.spectral_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), backend="triton")


def test_explicit_triton_float64_is_refused():
    with pytest.raises(TypeError, match="float64"):
        Fn.spectral_contrastive_loss(torch.randn(4, 3).double(), torch.randn(4, 3).double(),
                                     backend="triton")


def test_missing_op_reraises_reason(monkeypatch):
    monkeypatch.setitem(_backend._ops_cache, "spectral", ImportError("no triton here"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="no triton here"):
        Fn.spectral_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), backend="triton")
    # auto still works, on the reference
    Fn.spectral_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), backend="auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_losses_return_float32_scalars(dtype):
    a, b = torch.randn(6, 4).to(dtype), torch.randn(6, 4).to(dtype)
    for v in (Fn.spectral_contrastive_loss(a, b), Fn.mio_loss(a, b),
              Fn.minc_loss(a, b, torch.eye(4))):
        assert v.shape == () and v.dtype == torch.float32


def test_functional_equals_reference():
    a, b = torch.randn(9, 5), torch.randn(9, 5)
    torch.testing.assert_close(Fn.spectral_contrastive_loss(a, b, mu=2.0), R.spectral_loss(a, b, 2.0))
    torch.testing.assert_close(Fn.mio_loss(a, b, 0.2, 0.4, 0.5), R.mio_loss(a, b, 0.2, 0.4, 0.5))
    m = torch.eye(5) * 0.3
    torch.testing.assert_close(Fn.minc_loss(a, b, m), R.minc_loss(a, b, m))
    torch.testing.assert_close(Fn.minc_moment_sum(b), b.T @ b)


def test_public_api_exports():
    for name in ("MINCLoss", "MIOLoss", "SpectralContrastiveLoss", "ema_update_",
                 "MomentumEncoder", "cosine_momentum", "spectral_contrastive_loss",
                 "minc_loss", "mio_loss"):
        assert hasattr(mk, name), name


def test_losses_return_float64_for_float64_inputs():
    """The README's return-dtype statement: fp64 in, fp64 out (the oracle/gradcheck dtype)."""
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    for v in (Fn.spectral_contrastive_loss(a, b), Fn.mio_loss(a, b),
              Fn.minc_loss(a, b, torch.eye(4)), mk.MINCLoss()(a, b)):
        assert v.shape == () and v.dtype == torch.float64
