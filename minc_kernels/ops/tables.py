"""Measured decision tables: what ``auto`` runs where a GPU family has been measured.

Three choices in this package are pure speed questions between exact alternatives:

* ``spectral`` / ``barlow_twins`` / ``vicreg``: the ``"pairwise"`` or ``"gram"`` evaluation
  (:func:`minc_kernels.ops.spectral.choose_algorithm` and Barlow Twins' / VICReg's);
* ``gram.<launcher>``: the Gram layer's Triton kernels or its cuBLAS form
  (:func:`minc_kernels.ops.gram.gram_backend`; launchers ``gram``, ``gram_dot``,
  ``cross_gram``, ``rowmat`` (a fp32 ``G``) and ``rowmat_rounded`` (``G`` already rounded
  to the rows' half dtype, as the bf16 spectral and Barlow Twins gradients take it; also
  the kernels' wide tiles, ``triton_wide``)).

A cost model answers them everywhere, but it was off by up to 9× on an H200 (issue 21).
Where a table measured on the same GPU family exists, the measurement decides instead:
``python -m benchmarks.calibrate`` times every candidate over a grid of (rows, columns) and
writes one JSON file per family (``sm90`` = H100 and H200: one table for both, so that a
shape gives the same bits on either), committed as ``minc_kernels/tables/<family>.json``.
Between grid points the candidates' times are interpolated bilinearly in log-time over
(log rows, log columns); up to a factor of 2 outside the grid the edge is used; further out,
or where a candidate has no time, the table says nothing and the cost model decides.

``MINC_KERNELS_TABLE``: a path to a table file to use instead of the shipped one (for the
device family named in that file), or ``none`` to ignore every table.  Read when a family's
table is first needed (then cached; :func:`clear_cache` forgets it).

Only the CUDA devices' own family is looked up: CPU tensors (the interpreter) and meta
tensors (the static sm_90 suite, which compiles the Triton kernels whatever a table says)
always get the cost model.  Pure Python, no Triton import: :mod:`minc_kernels.info` reads it.
"""
from __future__ import annotations

import bisect
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TABLE_ENV", "SCHEMA", "Grid", "Table", "family", "table_for", "choose",
           "algorithm_decision", "gram_decision",
           "parse", "load_file", "shipped_path", "clear_cache", "dtype_key", "grad_key"]

TABLE_ENV = "MINC_KERNELS_TABLE"
SCHEMA = 1
_DIR = Path(__file__).resolve().parent.parent / "tables"
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: How far outside the measured grid (as a factor on rows or columns) a table still answers.
_REACH = 2.0


def dtype_key(dtype: torch.dtype) -> str | None:
    return _DTYPES.get(dtype)


def grad_key(need_grad: bool) -> str:
    return "grad" if need_grad else "nograd"


@dataclass(frozen=True)
class Grid:
    """Measured milliseconds of each candidate at every (rows, cols) of a grid (None: not
    measured there)."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    ms: dict  # candidate -> tuple over rows of tuples over cols of float | None

    def choose(self, rows: int, cols: int, candidates: tuple[str, ...]) -> str | None:
        """The candidate with the least interpolated time at (rows, cols), or None."""
        if any(c not in self.ms for c in candidates) or rows < 1 or cols < 1:
            return None
        ri = _bracket(self.rows, rows)
        ci = _bracket(self.cols, cols)
        if ri is None or ci is None:
            return None
        best, best_t = None, math.inf
        for cand in candidates:
            t = _interpolate(self.ms[cand], ri, ci)
            if t is None:
                return None
            if t < best_t:
                best, best_t = cand, t
        return best


def _bracket(axis: tuple[int, ...], x: int):
    """``(i0, i1, w)``: x lies between axis[i0] and axis[i1] at weight w of the way in log
    space (i0 == i1 at a grid point or clamped to an edge); None beyond ``_REACH``."""
    if x < axis[0] / _REACH or x > axis[-1] * _REACH:
        return None
    if x <= axis[0]:
        return 0, 0, 0.0
    if x >= axis[-1]:
        n = len(axis) - 1
        return n, n, 0.0
    i1 = bisect.bisect_left(axis, x)
    if axis[i1] == x:
        return i1, i1, 0.0
    i0 = i1 - 1
    return i0, i1, math.log(x / axis[i0]) / math.log(axis[i1] / axis[i0])


def _interpolate(ms, ri, ci) -> float | None:
    (r0, r1, wr), (c0, c1, wc) = ri, ci
    corners = ((r0, c0, (1 - wr) * (1 - wc)), (r0, c1, (1 - wr) * wc),
               (r1, c0, wr * (1 - wc)), (r1, c1, wr * wc))
    total = 0.0
    for r, c, w in corners:
        if w == 0.0:
            continue
        v = ms[r][c]
        if v is None or not v > 0:
            return None
        total += w * math.log(v)
    return math.exp(total)


@dataclass(frozen=True)
class Table:
    family: str
    source: str  # the file it came from
    provenance: dict  # device, commit, date, versions, command (as calibrate wrote them)
    decisions: dict  # decision name -> Grid

    def choose(self, decision: str, rows: int, cols: int,
               candidates: tuple[str, ...]) -> str | None:
        grid = self.decisions.get(decision)
        return None if grid is None else grid.choose(rows, cols, candidates)


def _bad(source: str, what: str) -> ValueError:
    return ValueError(f"decision table {source}: {what} (write it with python -m "
                      f"benchmarks.calibrate; set {TABLE_ENV}=none to ignore tables)")


def parse(data, source: str = "<table>") -> Table:
    """A :class:`Table` from calibrate's JSON, checked: a damaged table is an error naming the
    file and the field, never a silent wrong choice."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise _bad(source, f"schema must be {SCHEMA}, got "
                   f"{data.get('schema') if isinstance(data, dict) else type(data).__name__!r}")
    fam = data.get("family")
    if not isinstance(fam, str) or not fam:
        raise _bad(source, f"family must be a non-empty string such as 'sm90', got {fam!r}")
    decisions = {}
    for name, grid in (data.get("decisions") or {}).items():
        where = f"decisions[{name!r}]"
        if not isinstance(grid, dict):
            raise _bad(source, f"{where} must be an object")
        axes = []
        for axis in ("rows", "cols"):
            vals = grid.get(axis)
            if (not isinstance(vals, list) or not vals
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals)
                    or sorted(set(vals)) != vals):
                raise _bad(source, f"{where}.{axis} must be increasing positive ints, got {vals!r}")
            axes.append(tuple(vals))
        ms = grid.get("ms")
        if not isinstance(ms, dict) or len(ms) < 2:
            raise _bad(source, f"{where}.ms must map at least two candidates to times")
        table = {}
        for cand, rows in ms.items():
            ok = (isinstance(rows, list) and len(rows) == len(axes[0])
                  and all(isinstance(r, list) and len(r) == len(axes[1])
                          and all(v is None or (isinstance(v, (int, float))
                                                and not isinstance(v, bool) and v > 0
                                                and math.isfinite(v)) for v in r)
                          for r in rows))
            if not ok:
                raise _bad(source, f"{where}.ms[{cand!r}] must be {len(axes[0])} lists of "
                           f"{len(axes[1])} positive times (ms) or nulls")
            table[cand] = tuple(tuple(None if v is None else float(v) for v in r) for r in rows)
        decisions[name] = Grid(axes[0], axes[1], table)
    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    return Table(fam, source, prov, decisions)


def load_file(path) -> Table:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise _bad(str(path), f"cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise _bad(str(path), f"is not JSON ({exc})") from None
    return parse(data, str(path))


def shipped_path(fam: str) -> Path:
    """Where the package keeps ``fam``'s table (the file may not exist)."""
    return _DIR / f"{fam}.json"


@functools.lru_cache(maxsize=None)
def _table(fam: str, override: str | None) -> Table | None:
    if override is not None:
        if override.lower() in ("", "none", "off", "0"):
            return None
        table = load_file(override)
        return table if table.family == fam else None
    path = shipped_path(fam)
    return load_file(path) if path.is_file() else None


def clear_cache() -> None:
    """Forget loaded tables, choices and device families (tests; a table file rewritten)."""
    _table.cache_clear()
    _choose.cache_clear()
    _family_of.cache_clear()


@functools.lru_cache(maxsize=None)
def _family_of(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def family(device: torch.device) -> str | None:
    """``"sm90"`` for an H100/H200 (``sm<major><minor>`` of a CUDA device), None otherwise."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _family_of(index)


def table_for(device: torch.device) -> Table | None:
    """The table that decides for ``device``, or None (then the cost models decide)."""
    fam = family(device)
    return None if fam is None else _table(fam, os.environ.get(TABLE_ENV))


def choose(decision: str, device: torch.device, rows: int, cols: int,
           candidates: tuple[str, ...]) -> str | None:
    """The measured choice among ``candidates`` for a (rows, cols) problem on ``device``, or
    None where no table answers (the caller's cost model decides then).

    Called from the ops' bodies (eager code, at run time: never traced by TorchDynamo, and
    the sizes are real ints under dynamic shapes too); cached per shape."""
    fam = family(device)
    if fam is None:
        return None
    return _choose(decision, fam, os.environ.get(TABLE_ENV), int(rows), int(cols),
                   tuple(candidates))


@functools.lru_cache(maxsize=4096)
def _choose(decision, fam, override, rows, cols, candidates):
    table = _table(fam, override)
    return None if table is None else table.choose(decision, rows, cols, candidates)


def algorithm_decision(loss: str, dtype: torch.dtype, need_grad: bool) -> str:
    """The decision name of a loss's ``"pairwise"``/``"gram"`` choice, e.g.
    ``"spectral/bf16/grad"`` (rows = the batch N, cols = the feature width k)."""
    return f"{loss}/{dtype_key(dtype)}/{grad_key(need_grad)}"


def gram_decision(launcher: str, dtype: torch.dtype) -> str:
    """The decision name of a Gram-layer launcher's Triton/cuBLAS choice, e.g.
    ``"gram.rowmat/bf16"`` (rows, cols = the shape of its ``X``)."""
    return f"gram.{launcher}/{dtype_key(dtype)}"
