"""Studies of the paper's claims on real data (issue 8), one command each:

* ``python -m benchmarks.studies.grad_variance``: gradient variance and SNR vs batch size;
* ``python -m benchmarks.studies.collapse``: effective rank / feature std over training;
* ``python -m benchmarks.studies.batch_size``: linear-probe accuracy vs batch size.

Each writes JSON + PNG (+ a Markdown table) under ``benchmarks/results/studies/<study>/``.
"""
