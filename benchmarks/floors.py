"""Work models of one loss call and the floor they give on a machine with measured ceilings.

Pure Python (no torch), so that :mod:`benchmarks.report` can rebuild tables from a
``results.json`` anywhere.

Three models per case (loss, algorithm, B, k, dtype, mode, where the gradient is formed):

* :func:`loss_flops`: the matmul flops the formulation must do (elementwise work such as
  norms, softplus and clipping is not counted);
* :func:`loss_bytes`: compulsory memory traffic: each input read once per pass that needs
  it, each gradient written once, the fp32 state that crosses from one pass to the next
  (a fused provider's gradient buffer, MINC's k×k moment) written and read once.
  Intermediates of a formulation (the B×B matrix, the k×k spectral Grams) are not counted;
* :data:`MIN_LAUNCHES`: a call does at least one kernel per pass that has work: ``fwd``
  1, ``bwd`` 1 (even a provider that formed the gradient in the forward scales it by the
  upstream gradient there), ``fwd+bwd`` 2.

Where the gradient is formed matters.  The ``minc_kernels`` ops of all three losses form
the input gradient in the forward whenever an input requires grad (the benchmark's ``fwd``
mode is the training forward, so it does) and save it; their backward only scales it.  Such
a provider is credited with the forward and backward matmuls in ``fwd`` and with none in
``bwd`` (crediting the backward's model flops there printed up to 870 % of the matmul
peak for the H200's ``bwd`` cases).  For MINC the fused gradient ``(2/B)(M p_i - t_i)``
reuses the ``P M`` product of the loss, so its whole step is ``4Bk²`` where eager
autograd, which does not know ``M`` is symmetric, forms a second ``2Bk²`` product in
backward.

The floor of a case is ``max(flops / matmul ceiling, bytes / copy ceiling,
launches × launch floor)``; :func:`floor` names which of the three binds.  The measured
time over the floor is how far a provider is from what the machine allows for the work
its formulation does (100 % of floor = at the floor).
"""
from __future__ import annotations

# Families whose ops form the input gradient in the forward pass (see the docstring).
GRAD_IN_FORWARD_FAMILIES = ("minc_kernels",)
# Losses with a model here (per algorithm, MINC's fused reuse); others use their registry
# entry's ``matmul_flops`` through :func:`flops_by_mode` (benchmarks.cases.loss_flops).
MODELLED = ("spectral", "minc", "mio")
MIN_LAUNCHES = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}
_PASSES = {"fwd": (1, 0), "bwd": (0, 1), "fwd+bwd": (1, 1)}


def _passes(mode: str) -> tuple[int, int]:
    try:
        return _PASSES[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {tuple(_PASSES)}, got {mode!r}") from None


def flops_by_mode(fwd: float, bwd: float, mode: str, grad_in_forward: bool = False) -> float:
    """A loss's (forward, backward) matmul flops for ``mode``; a provider that forms the
    gradient in the forward does both in ``fwd`` and none in ``bwd``."""
    f, w = _passes(mode)
    if grad_in_forward:
        return (fwd + bwd) if f else 0.0
    return f * fwd + w * bwd


def loss_flops(loss: str, algorithm: str | None, b: int, k: int, mode: str,
               grad_in_forward: bool = False) -> float:
    """Matmul flops of one call.

    Gradient formed in backward (eager, torch.compile):

    * spectral, pairwise and matrix: fwd ``2B²k`` (``S = Z1 Z2ᵀ``), bwd ``4B²k`` (``G Z2``,
      ``Gᵀ Z1``; the pairwise kernel's recomputed ``S`` tiles are not useful work);
    * spectral, gram: fwd ``4Bk²`` (``Z1ᵀZ1``, ``Z2ᵀZ2``), bwd ``4Bk²`` (``Z1 G2``, ``Z2 G1``);
    * spectral, auto (compile, minc_kernels): the cheaper of the two for the mode;
    * minc: fwd ``4Bk²`` (moment ``TᵀT`` and ``P M``), bwd ``2Bk²`` (``(G∘P) Mᵀ``);
    * mio: fwd ``8B²k`` (``S = Z Zᵀ`` with 2B rows), bwd ``8B²k`` (``dZ = 2 G Z``).

    Gradient formed in the forward (``grad_in_forward``, the ``minc_kernels`` ops): ``fwd``
    and ``fwd+bwd`` are credited with the whole step (spectral pairwise ``6B²k``, gram
    ``8Bk²``, auto the cheaper; minc ``4Bk²``, the gradient reusing ``P M``; mio
    ``16B²k``), ``bwd`` with 0.
    """
    fwd, bwd = _passes(mode)
    if grad_in_forward:
        if not fwd:
            return 0.0
        fwd, bwd = 1, 1
    if loss == "spectral":
        pairwise = fwd * 2.0 * b * b * k + bwd * 4.0 * b * b * k
        gram = fwd * 4.0 * b * k * k + bwd * 4.0 * b * k * k
        if algorithm in ("pairwise", "matrix"):  # the same products (S written or not)
            return pairwise
        if algorithm == "gram":
            return gram
        return min(pairwise, gram)
    if loss == "minc":
        if grad_in_forward:
            return 4.0 * b * k * k
        return fwd * 4.0 * b * k * k + bwd * 2.0 * b * k * k
    if loss == "mio":
        return (fwd + bwd) * 8.0 * b * b * k
    raise ValueError(f"unknown loss {loss!r}")


def loss_bytes(loss: str, b: int, k: int, itemsize: int, mode: str,
               grad_in_forward: bool = False, n_inputs: int = 2, n_grads: int = 2) -> float:
    """Compulsory DRAM bytes of one call (see the module docstring).

    ``x = B·k·itemsize`` (one input), ``g = 4·B·k`` (one fp32 gradient buffer),
    ``m = 4·k²`` (MINC's fp32 moment).

    * spectral, mio (two inputs, both with gradients): fwd ``2x`` (+ ``2g`` written when the
      gradient is formed there); bwd ``2x`` read + ``2x`` written (fused: ``2g`` read +
      ``2x`` written).  Other losses alike with their ``n_inputs`` inputs of which
      ``n_grads`` take a gradient.
    * minc (``p`` with a gradient, ``t`` without): fwd ``t`` read and ``M`` written for the
      moment, ``p``, ``t``, ``M`` read for the loss: ``3x + 2m`` (+ ``g`` fused); bwd ``p``
      and ``M`` read, ``dp`` written: ``2x + m`` (fused: ``g + x``).
    """
    fwd, bwd = _passes(mode)
    x = float(b) * k * itemsize
    g = 4.0 * b * k
    if loss == "minc":
        m = 4.0 * k * k
        f = 3 * x + 2 * m + (g if grad_in_forward else 0.0)
        w = g + x if grad_in_forward else 2 * x + m
    else:
        n, ng = (2, 2) if loss in ("spectral", "mio") else (n_inputs, n_grads)
        f = n * x + (ng * g if grad_in_forward else 0.0)
        w = ng * g + ng * x if grad_in_forward else n * x + ng * x
    return fwd * f + bwd * w


def floor(flops: float, nbytes: float, launches: int, matmul_tflops: float | None,
          copy_gbps: float | None, launch_ms: float | None) -> dict:
    """``{"ms", "bound", "flop_ms", "byte_ms", "launch_ms"}``: the largest of the three
    floors that a ceiling is known for (``bound`` names it); ``ms`` None if none is."""
    parts = {
        "flop": flops / (matmul_tflops * 1e12) * 1e3 if matmul_tflops else None,
        "byte": nbytes / (copy_gbps * 1e9) * 1e3 if copy_gbps else None,
        "launch": launches * launch_ms if launch_ms else None,
    }
    known = {k: v for k, v in parts.items() if v is not None}
    out = {f"{k}_ms": v for k, v in parts.items()}
    if not known:
        return dict(out, ms=None, bound=None)
    bound = max(known, key=known.get)
    return dict(out, ms=known[bound], bound=bound)
