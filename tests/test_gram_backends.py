"""The Gram layer's two implementations (MINC_KERNELS_GRAM=triton|cublas) agree on every
launcher, and the losses on top of them agree with the eager reference under both."""
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from minc_kernels.ops import gram as G  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-5, atol=2e-5),
       torch.float16: dict(rtol=2e-5, atol=2e-5)}


def _both(monkeypatch, fn):
    out = {}
    for backend in G.GRAM_BACKENDS:
        monkeypatch.setenv(G.GRAM_ENV, backend)
        out[backend] = fn()
    return out["triton"], out["cublas"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,k", [(19, 24), (40, 17)])
def test_launchers_agree(monkeypatch, dtype, b, k):
    g = torch.Generator().manual_seed(b * k)
    x = (torch.randn(b, k, generator=g) * 0.3).to(dtype).to(DEV)
    y = (torch.randn(b, k, generator=g) * 0.3).to(dtype).to(DEV)
    m = torch.randn(k, k, generator=g).to(DEV)
    m = (m + m.T) / 2
    d = torch.randn(b, generator=g).to(DEV)
    tol = TOL[dtype]
    for t_out, c_out in [
        _both(monkeypatch, lambda: G.gram(x)),
        _both(monkeypatch, lambda: G.gram_dot(x, m)),
        _both(monkeypatch, lambda: G.cross_gram(x, y)),
    ]:
        torch.testing.assert_close(c_out, t_out, **tol)
    for gha in (False, True):
        for need_grad in (False, True):
            ta, ca = _both(monkeypatch, lambda: G.rowmat(x, m, y, d, 0.7, -0.3, 0.2, gha, need_grad))
            for tv, cv in zip(ta, ca):
                if tv is None:
                    assert cv is None
                else:
                    torch.testing.assert_close(cv, tv, **tol)


def test_unknown_gram_backend_is_named(monkeypatch):
    monkeypatch.setenv(G.GRAM_ENV, "cutlass")
    with pytest.raises(ValueError, match="MINC_KERNELS_GRAM"):
        G.gram(torch.randn(4, 3, device=DEV))
