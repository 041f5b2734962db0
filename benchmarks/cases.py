"""What is benchmarked: loss inputs, providers, flop models, EMA parameter lists.

The losses are those of ``minc_kernels.losses.REGISTRY`` (:data:`LOSSES`, in its order):
a loss's inputs come from its entry's ``arg_names``/``grad_args``, its call from ``step``
(the functional form; MINC's step includes the batch moment ``M = TᵀT/B``), the
``compile`` provider compiles its ``reference``, and the ``minc_kernels`` provider needs its
``op``.  Nothing here names a loss except the flop/byte models of :mod:`benchmarks.floors`
(other losses take the registry's ``matmul_flops``).

Providers of a loss (one entry each in the results):

* ``eager`` -- the loss's ``step`` with ``backend="reference"``.  A loss whose registry
  ``variants`` are exact alternative algorithms (keyword ``algorithm`` alone: the spectral
  loss's ``pairwise``, which materialises the B×B matrix ``Z1 Z2ᵀ``, and ``gram``, the k×k
  feature Grams; ``matrix`` is ``pairwise`` in eager PyTorch, the registry's
  ``eager_alias``) gets one eager entry per algorithm (``eager-pairwise``, ``eager-gram``):
  which one is faster depends on B vs k, so the speed-up of the other providers is taken
  against the *faster of the two* (the strictest eager baseline).  Other variants (MINC's
  ``gha`` changes the gradient) are not baselines.
* ``compile`` -- ``torch.compile`` of the registry's ``reference`` (spectral with
  ``algorithm="auto"``), one compiled object per loss, ``dynamic=True`` by default so
  that a grid of 24 shapes costs one compilation per loss (and per spectral branch)
  instead of 24; ``--compile-dynamic false`` gives per-shape static graphs.
* ``minc_kernels`` -- ``step`` with ``backend="triton"`` (spectral: ``"auto"``).

Modes: ``fwd`` is the training forward (inputs require grad, so whatever a provider
saves for backward is part of it); ``bwd`` times ``loss.backward(retain_graph=True)``
of one fixed forward; ``fwd+bwd`` is both.
"""
from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass, field
from typing import Callable

import torch

from minc_kernels import reference
from minc_kernels.losses import REGISTRY

from . import floors
from .floors import GRAD_IN_FORWARD_FAMILIES

LOSSES = tuple(REGISTRY)
MODES = ("fwd+bwd", "fwd", "bwd")
PROVIDERS = ("eager", "compile", "minc_kernels")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# minc_kernels.ops.<op> per loss (None: the loss has no kernels)
OP_NAME = {name: spec.op for name, spec in REGISTRY.items()}

GPU_B = (256, 512, 1024, 2048, 4096, 8192)
GPU_K = (128, 512, 2048, 8192)
GPU_QUICK_B = (512, 2048, 8192)
GPU_QUICK_K = (128, 2048)
CPU_B = (128, 256, 512)
CPU_K = (64, 256)
CPU_QUICK_B = (128, 512)
CPU_QUICK_K = (64, 256)
MIO_MEMORY_CASE = (32768, 128)  # (B, k): the eager 2B×2B matrices do not fit


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# --------------------------------------------------------------------------- work models
# The flop/byte models and floors live in benchmarks/floors.py (torch-free, for the report).


def spec(loss: str):
    """The registry entry of ``loss`` (a clear error for an unknown name)."""
    try:
        return REGISTRY[loss]
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; the registry has {list(REGISTRY)}") from None


def grad_in_forward(family: str, loss: str | None = None) -> bool:
    """Whether the provider family's ops form the input gradient in the forward pass
    (``loss`` None: whether the family's ops do in general).

    Every op of the package does today (its backward launches no Triton kernel, only
    scales the saved gradient: tests/test_benchmarks.py checks that for each registry loss
    with kernels through the launch stub of benchmarks/cpu_host_overhead.py).  A registry
    entry's own ``grad_in_forward`` attribute, if it grows one, wins."""
    if family not in GRAD_IN_FORWARD_FAMILIES:
        return False
    if loss is None:
        return True
    s = spec(loss)
    own = getattr(s, "grad_in_forward", None)
    return bool(own) if own is not None else s.op is not None


def loss_flops(loss: str, algorithm: str | None, b: int, k: int, mode: str,
               grad_in_forward: bool = False) -> float:
    """Matmul flops of one call: :func:`benchmarks.floors.loss_flops` for the losses it
    models, else the registry's ``matmul_flops`` (fwd, bwd) split by mode the same way."""
    if loss in floors.MODELLED:
        return floors.loss_flops(loss, algorithm, b, k, mode, grad_in_forward)
    fwd, bwd = spec(loss).matmul_flops(b, k)
    return floors.flops_by_mode(fwd, bwd, mode, grad_in_forward)


def loss_bytes(loss: str, b: int, k: int, itemsize: int, mode: str,
               grad_in_forward: bool = False) -> float:
    """Compulsory bytes of one call (:func:`benchmarks.floors.loss_bytes`; other losses by
    their registry's input and gradient counts)."""
    s = spec(loss)
    return floors.loss_bytes(loss, b, k, itemsize, mode, grad_in_forward,
                             n_inputs=len(s.arg_names), n_grads=len(s.grad_args))


# --------------------------------------------------------------------------- inputs
@dataclass
class LossInputs:
    args: tuple
    grad_tensors: list = field(default_factory=list)  # inputs whose .grad backward fills


def make_inputs(loss: str, b: int, k: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> LossInputs:
    """Random (B, k) features, one per registry ``arg_names``, those in ``grad_args``
    requiring grad; scaled so that some rows exceed the spectral clip radius."""
    s = spec(loss)
    gen = torch.Generator(device=device).manual_seed(seed)
    args = []
    for i in range(len(s.arg_names)):
        x = torch.randn(b, k, device=device, dtype=torch.float32, generator=gen)
        x = (x * (1.2 / math.sqrt(k))).to(dtype)
        args.append(x.requires_grad_(i in s.grad_args))
    return LossInputs(tuple(args), [x for x in args if x.requires_grad])


# --------------------------------------------------------------------------- loss functions
def algorithms(loss: str) -> list[str]:
    """The registry variants that are exact alternative algorithms of the loss (keyword
    ``algorithm`` alone): eager baselines of their own."""
    return [name for name, kw in spec(loss).variants.items() if set(kw) == {"algorithm"}]


def _functional_fn(loss: str, backend: str, algorithm: str | None) -> Callable:
    s = spec(loss)
    variant = dict(s.variants.get(algorithm, {})) if algorithm not in (None, "auto") else {}
    if algorithm not in (None, "auto") and not variant:
        raise ValueError(f"{loss}: no variant {algorithm!r} in the registry "
                         f"(variants: {list(s.variants)})")
    step = s.step

    def call(a, b):
        return step(a, b, backend=backend, **variant)
    return call


@dataclass
class ProviderEntry:
    """One column of the results: a provider label and how to build its loss function."""

    label: str  # "eager", "eager-pairwise", "compile", "minc_kernels"
    family: str  # "eager" | "compile" | "minc_kernels"
    algorithm: str | None  # losses with alternative algorithms only (spectral)


def provider_entries(loss: str, providers: tuple[str, ...]) -> list[ProviderEntry]:
    algos = algorithms(loss)
    out = []
    for prov in providers:
        if prov == "eager" and algos:
            out += [ProviderEntry(f"eager-{a}", "eager", a) for a in algos
                    if a not in spec(loss).eager_alias]
        elif prov == "eager":
            out.append(ProviderEntry("eager", "eager", None))
        else:
            out.append(ProviderEntry(prov, prov, "auto" if algos else None))
    return out


def _fresh_function(fn: Callable, tag: str) -> Callable:
    """A wrapper of ``fn`` with its own code object, so that dynamo caches it separately."""
    def wrapper(*args):
        return fn(*args)
    code = wrapper.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, wrapper.__globals__, code.co_name, None, wrapper.__closure__)


class CompiledCache:
    """``torch.compile`` objects of the references, one per loss (two for ``bwd``).

    ``bwd`` replays ``backward(retain_graph=True)``, which AOTAutograd's donated buffers
    forbid (backward may reuse saved tensors' memory).  That mode therefore gets its own
    compiled object, compiled and run under ``donated_buffer=False`` (see
    :meth:`mode_context`), while ``fwd`` and ``fwd+bwd`` keep PyTorch's defaults.
    A compile failure is remembered per loss so that it costs one attempt.
    """

    def __init__(self, dynamic: bool | None = None):
        self.dynamic = dynamic
        self.fns: dict[tuple[str, bool], Callable] = {}
        self.broken: dict[tuple[str, bool], str] = {}  # (loss, bwd replay copy) -> error
        for name in ("recompile_limit", "cache_size_limit"):
            # Grids visit dozens of shapes; the default limit (8) would fall back to eager.
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))

    def get(self, loss: str, mode: str = "fwd+bwd") -> Callable:
        replay = mode == "bwd"
        if (loss, replay) not in self.fns:
            fn = spec(loss).reference
            if replay:
                fn = _fresh_function(fn, "replay")
            self.fns[(loss, replay)] = torch.compile(fn, dynamic=self.dynamic)
        return self.fns[(loss, replay)]

    @staticmethod
    def mode_context(mode: str):
        if mode == "bwd" and hasattr(torch._functorch.config, "donated_buffer"):
            return torch._functorch.config.patch(donated_buffer=False)
        return contextlib.nullcontext()


def loss_fn(loss: str, entry: ProviderEntry, compiled: CompiledCache, mode: str = "fwd+bwd"
            ) -> Callable:
    if entry.family == "eager":
        return _functional_fn(loss, "reference", entry.algorithm)
    if entry.family == "compile":
        return compiled.get(loss, mode)
    if entry.family == "minc_kernels":
        return _functional_fn(loss, "triton", entry.algorithm)
    raise ValueError(f"unknown provider {entry.family!r}")


def mode_runner(fn: Callable, inputs: LossInputs, mode: str) -> Callable[[], None]:
    """A no-argument callable doing one ``mode`` step (``bwd`` runs one forward now)."""
    args, grads = inputs.args, inputs.grad_tensors

    def clear() -> None:
        for x in grads:
            x.grad = None

    if mode == "fwd":
        def run_fwd() -> None:
            fn(*args)
        return run_fwd
    if mode == "fwd+bwd":
        def run_fwd_bwd() -> None:
            clear()
            fn(*args).backward()
        return run_fwd_bwd
    if mode == "bwd":
        loss = fn(*args)

        def run_bwd() -> None:
            clear()
            loss.backward(retain_graph=True)
        return run_bwd
    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------- EMA
def byol_target_shapes(scale: str = "resnet50") -> tuple[str, list[torch.Size]]:
    """Shapes of the tensors one BYOL/MINC EMA step updates: backbone + projector.

    ``"resnet50"``: torchvision ResNet-50 (without its classifier) parameters and floating
    BN buffers, plus the projector MLP 2048→4096 (BN, ReLU)→256: 33.0 M values in 273
    tensors.  The predictor (256→4096→256, 2.1 M) has no EMA copy in BYOL/MINC (the
    training engine averages ``model.encoder``), so it is not in the list.
    ``"resnet18"``: the CPU-sized list, ResNet-18 + projector 512→1024→128.
    """
    import torchvision
    from torch import nn

    if scale == "resnet50":
        ctor, feat, hidden, out = torchvision.models.resnet50, 2048, 4096, 256
    elif scale == "resnet18":
        ctor, feat, hidden, out = torchvision.models.resnet18, 512, 1024, 128
    else:
        raise ValueError(f"unknown EMA model {scale!r}")
    with torch.device("meta"):
        backbone = ctor()
        backbone.fc = nn.Identity()
        projector = nn.Sequential(nn.Linear(feat, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, out))
        model = nn.Sequential(backbone, projector)
    shapes = [p.shape for p in model.parameters()]
    shapes += [b.shape for b in model.buffers() if b.is_floating_point()]
    name = f"{scale}+projector {feat}-{hidden}-{out}"
    return name, shapes


def ema_tensors(shapes: list[torch.Size], online_dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    targets = [torch.randn(s, device=device, generator=gen) for s in shapes]
    onlines = [torch.randn(s, device=device, generator=gen).to(online_dtype) for s in shapes]
    return targets, onlines


def ema_bytes_per_param(online_dtype: torch.dtype) -> int:
    """Read target (4) + read online (4 or 2) + write target (4)."""
    return 8 + torch.empty((), dtype=online_dtype).element_size()


EMA_PROVIDERS = ("loop", "foreach", "minc_kernels", "extension-raw")


def ema_fn(provider: str, targets: list, onlines: list, momentum: float) -> Callable[[], None]:
    """One EMA step by ``provider``.

    ``loop``: per-tensor ``lerp_`` (upcasting a bf16 online tensor first);
    ``foreach``: ``torch._foreach_lerp_`` (the reference, the baseline);
    ``minc_kernels``: ``ema_update_(..., check_finite=False, backend="extension")``
    (argument validation included); ``extension-raw``: the extension's entry point alone.
    """
    from minc_kernels import _ext, ema

    weight = 1.0 - momentum
    if provider == "loop":
        def loop() -> None:
            for t, o in zip(targets, onlines):
                t.lerp_(o if o.dtype == t.dtype else o.to(t.dtype), weight)
        return loop
    if provider == "foreach":
        return lambda: reference.ema_update_(targets, onlines, momentum)
    if provider in ("minc_kernels", "extension-raw"):
        ext = _ext.load()
        if ext is None:
            ok, why = _ext.status()
            raise RuntimeError(f"extension unavailable: {why}")
        device = targets[0].device
        supports = getattr(_ext, "supports", None)
        if supports is not None and not supports(device):
            raise RuntimeError(f"the extension has no kernel for {device.type} tensors "
                               f"(built with {_ext.build_info()})")
        if provider == "minc_kernels":
            return lambda: ema.ema_update_(targets, onlines, momentum, check_finite=False,
                                           backend="extension")
        # The registered op (what ema_update_ calls after its checks), else the module's.
        op = getattr(getattr(torch.ops, "minc_kernels", None), "ema_update_", None)
        raw = op if op is not None else ext.ema_update_
        return lambda: raw(targets, onlines, momentum)
    raise ValueError(f"unknown EMA provider {provider!r}")
