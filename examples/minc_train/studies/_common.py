"""What the studies share: where results go, option-list parsing, JSON output, seed statistics.
(Their plots share :func:`minc_train.plots.pyplot` and :func:`minc_train.plots.save_figure`.)"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Collection

# examples/ (examples/minc_train/studies/ -> ../..) and the repository root above it: study
# results land in examples/results/studies/<study>/, scratch runs in <root>/runs/studies/
EXAMPLES = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(EXAMPLES)
RESULTS = os.path.join(EXAMPLES, "results", "studies")


def comma_list(p: argparse.ArgumentParser, flag: str, text: str, allowed: Collection[str]) -> list[str]:
    """The comma-separated names of option ``flag`` (blanks dropped, order kept); a parser
    error naming the unknown ones, or the empty list, otherwise."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        p.error(f"{flag}: unknown {bad or 'empty list'}; expected a subset of {', '.join(allowed)}")
    return items


def write_json(obj, path: str) -> None:
    """``obj`` as indented JSON (other types as ``str``), written to a temporary file and
    renamed: a study stopped mid-write never leaves a truncated file, which a resumed run
    would take for a finished one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def mean_std(vals) -> dict:
    """``{"mean", "std", "n", "values"}`` of the values that are not None (sample std; 0.0
    for one value; mean and std None for none)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}
