"""Benchmarks of minc_kernels against eager PyTorch and ``torch.compile``.

``python -m benchmarks.run`` times every provider side by side and writes
``results.json``, ``results.md`` and plots (see ``benchmarks/README.md``);
``pytest benchmarks -m benchmark`` runs the pytest-benchmark microbenchmarks.
"""
