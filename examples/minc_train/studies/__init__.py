"""Studies of the paper's claims on real data (issue 8), one command each:

* ``python -m minc_train.studies.grad_variance``: gradient variance and SNR vs batch size;
* ``python -m minc_train.studies.collapse``: effective rank / feature std over training;
* ``python -m minc_train.studies.batch_size``: linear-probe accuracy vs batch size.

Each writes JSON + PNG (+ a Markdown table) under ``examples/results/studies/<study>/`` (``--out``
to change), wherever it is run from.
"""
