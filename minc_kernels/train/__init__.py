"""Reference self-supervised training program (``minc-train``); not imported by ``minc_kernels``.

Modules: :mod:`.data` (datasets, batched augmentations), :mod:`.models` (backbones, heads),
:mod:`.optim` (LARS, schedules), :mod:`.engine` (training loop, checkpoints),
:mod:`.metrics` (kNN, linear probe, effective rank), :mod:`.plots`, :mod:`.cli` (``main``).
Needs ``torchvision`` (and ``matplotlib`` for plots): ``pip install minc_kernels[train]``.
"""
