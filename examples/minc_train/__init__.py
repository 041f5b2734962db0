"""Reference self-supervised training program (``minc-train``); not imported by ``minc_kernels``.

Modules: :mod:`.data` (datasets, batched augmentations), :mod:`.models` (backbones, heads),
:mod:`.optim` (LARS, schedules), :mod:`.engine` (training loop, checkpoints),
:mod:`.metrics` (kNN, linear probe, effective rank), :mod:`.plots`, :mod:`.cli` (``main``).
An application on the public API of ``minc_kernels``, installed apart with its own
dependencies (torchvision, tqdm, numpy, matplotlib): ``pip install -e examples``.
The studies live in :mod:`.studies`.
"""
