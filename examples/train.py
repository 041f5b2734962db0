#!/usr/bin/env python
"""Same as the ``minc-train`` console script (``pip install -e examples``): ``python examples/train.py --help``."""
import sys

from minc_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
