"""Checkpoint files: atomic writes, a SHA-256 digest of the payload verified on load, and one
clear error (naming the file) for every checkpoint that cannot be resumed.

A checkpoint is one ``torch.save`` file that loads with ``weights_only=True``: the payload
(``model``, ``target``, ``loss``, ``optimizer``, ``scaler``, ``epoch``, ``step``, ``rng``,
``history``, ``config``) plus three keys of its own, ``format``, ``format_version`` and
``sha256``.  The digest covers the payload's content (every tensor's dtype, shape and bytes,
every plain value, in order), not the file's bytes, so it is checked on what was loaded: a
bit flip that still unpickles, a truncated tensor or a file written by something else is
refused instead of resumed.

Writes go to ``<path>.<pid>.tmp`` in the same folder, are flushed to disk, then renamed over
``path``: a crash or a full disk leaves the previous checkpoint as it was (and the partial
file is removed, or cleaned by :func:`remove_stale_tmp` at the next start).
"""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import math
import os
import pickle
import struct

import torch

FORMAT = "minc-train-checkpoint"
FORMAT_VERSION = 2
_OWN_KEYS = ("format", "format_version", "sha256")
REQUIRED = ("model", "target", "loss", "optimizer", "epoch", "step", "rng", "config")
# the parts whose floating-point tensors must be finite for a run to continue
_FINITE_PARTS = ("model", "target", "loss", "optimizer")
# errnos that mean "this folder cannot take the file": said in one line, not a traceback
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                  errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file and what to do."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written; the previous one (if any) is unchanged."""


# ---------------------------------------------------------------------- digest
def _feed(h, obj, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            raise TypeError(f"{where}: cannot digest a {t.layout} tensor")
        t = t.to("cpu").contiguous()
        h.update(b"T" + str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, bool) or obj is None:
        h.update(b"B" + repr(obj).encode())
    elif isinstance(obj, int):
        h.update(b"I" + str(obj).encode() + b";")
    elif isinstance(obj, float):
        h.update(b"F" + float(obj).hex().encode() + b";")
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(b"S" + struct.pack("<Q", len(b)) + b)
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<Q", len(obj)))
        for k, v in obj.items():
            _feed(h, k, where)
            _feed(h, v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<Q", len(obj)))
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where}: cannot digest a value of type {type(obj).__name__}")


def payload_digest(payload: dict) -> str:
    """SHA-256 (hex) of the payload's content: tensors by dtype, shape and bytes, plain values
    by type and value, containers in order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k not in _OWN_KEYS}, "checkpoint")
    return h.hexdigest()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------- write
def _write_bytes(data, tmp: str) -> None:
    """Write ``data`` to the new file ``tmp`` and flush it to the disk (the one place that
    touches the file system, so tests can fake a full disk here)."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _storage_message(exc: OSError) -> str:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why += " (the disk or the file-size limit is full)"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why += " (the folder is not writable)"
    return why


def save(payload: dict, path: str) -> str:
    """Write ``payload`` (moved to the CPU) with its digest to ``path`` atomically; returns
    the digest.  Raises :class:`CheckpointWriteError` (one line, naming ``path``) when the
    file cannot be written; ``path`` is then unchanged and no temporary file is left."""
    for k in _OWN_KEYS:
        if k in payload:
            raise ValueError(f"the checkpoint payload may not use the key {k!r}")
    payload = _to_cpu(payload)
    digest = payload_digest(payload)
    buf = io.BytesIO()
    torch.save({**payload, "format": FORMAT, "format_version": FORMAT_VERSION, "sha256": digest}, buf)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        _write_bytes(buf.getbuffer(), tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            kept = "the previous checkpoint is kept" if os.path.isfile(path) else "no checkpoint was written"
            raise CheckpointWriteError(f"could not write the checkpoint {path}: {_storage_message(exc)}; "
                                       f"{kept}") from exc
        raise
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return digest


def remove_stale_tmp(path: str) -> list[str]:
    """Remove ``<path>.<pid>.tmp`` files left by interrupted writes (a killed process), except
    those of a process that is still running; returns the removed paths."""
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".*.tmp"):
        pid = tmp[len(path) + 1:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # a live process may be writing it
            except ProcessLookupError:
                pass
            except OSError:
                continue  # exists, not ours to judge
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


# ---------------------------------------------------------------------- read
def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    text = text[0].split(". ")[0] if text else ""  # the first sentence: torch appends advice
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _non_finite(obj, where: str):
    """The first place in ``obj`` holding a NaN/Inf floating-point tensor element, or None."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return where
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        bad = _non_finite(v, f"{where}[{k!r}]")
        if bad:
            return bad
    return None


_CACHE: dict = {}


def _key(path: str):
    st = os.stat(path)
    return os.path.realpath(path), st.st_mtime_ns, st.st_size


def read(path: str, keep: bool = False) -> dict:
    """Load and verify the checkpoint ``path`` (a file) on the CPU with ``weights_only=True``;
    returns its dict.  Every failure is a :class:`CheckpointError` naming the file: missing,
    empty, unreadable (truncated, random bytes), refused by the weights-only unpickler, not a
    minc-train checkpoint, a digest that does not match (corrupted), or non-finite weights.
    A checkpoint written before digests existed (no ``sha256``) loads with ``ck["verified"]``
    False.  ``keep``: remember the result so that the next ``read`` of the unchanged file
    returns it without loading it again (and forgets it)."""
    try:
        k = _key(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({_first_line(exc)})") from None
    if k in _CACHE:
        ck = _CACHE.pop(k)
        if keep:
            _CACHE[k] = ck
        return ck
    _CACHE.clear()
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: is a folder, not a file")
    if k[2] == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes; an interrupted copy?); "
                              "restore a copy or start a new run")
    what = "restore a copy or start a new run"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message: boilerplate, then the line that says what stopped it
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        blocked = [ln for ln in lines if "GLOBAL" in ln or ln.startswith("Unsupported global")]
        other = [ln for ln in lines if ln.startswith("Unsupported")]
        why = (blocked or other or [_first_line(exc)])[0]
        why = why if len(why) <= 160 else why[:157] + "..."
        if blocked:
            raise CheckpointError(f"checkpoint {path}: refused, it holds objects other than tensors and "
                                  f"plain values ({why}; nothing in it was run): not a minc-train "
                                  "checkpoint") from None
        raise CheckpointError(f"checkpoint {path}: unreadable, truncated or corrupted (the weights-only "
                              f"loader stopped: {why}; nothing in it was run); {what}") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  (torch.load fails in many ways on damaged files)
        raise CheckpointError(f"checkpoint {path}: unreadable, truncated or corrupted "
                              f"({_first_line(exc)}); {what}") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"checkpoint {path}: not a minc-train checkpoint (it holds a "
                              f"{type(ck).__name__}, not a dict)")
    missing = [r for r in REQUIRED if r not in ck]
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a minc-train checkpoint (no "
                              f"{', '.join(repr(m) for m in missing)})")
    if "sha256" in ck:
        if ck.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path}: not a minc-train checkpoint (format "
                                  f"{ck.get('format')!r})")
        if not isinstance(ck.get("format_version"), int) or ck["format_version"] > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path}: written by a newer minc-train (format version "
                                  f"{ck.get('format_version')!r}, this one reads up to {FORMAT_VERSION})")
        try:
            digest = payload_digest(ck)
        except TypeError as exc:
            raise CheckpointError(f"checkpoint {path}: not a minc-train checkpoint ({exc})") from None
        if digest != ck["sha256"]:
            raise CheckpointError(f"checkpoint {path}: corrupted, its contents do not match the digest "
                                  f"written with it; {what}")
        ck["verified"] = True
    else:
        ck["verified"] = False
    types = {"epoch": int, "step": int, "config": dict, "rng": dict, "model": dict, "loss": dict,
             "optimizer": dict}
    for name, typ in types.items():
        if not isinstance(ck[name], typ) or isinstance(ck[name], bool):
            raise CheckpointError(f"checkpoint {path}: not a minc-train checkpoint ({name!r} is a "
                                  f"{type(ck[name]).__name__})")
    if ck["epoch"] < 0 or ck["step"] < 0:
        raise CheckpointError(f"checkpoint {path}: invalid epoch {ck['epoch']} / step {ck['step']}")
    for part in _FINITE_PARTS:
        bad = _non_finite(ck.get(part), part)
        if bad:
            raise CheckpointError(f"checkpoint {path}: holds NaN/Inf values in {bad}; it cannot be "
                                  "resumed (the run had diverged); resume an earlier copy with a lower "
                                  "--lr, or start a new run")
    if keep:
        _CACHE[k] = ck
    return ck
