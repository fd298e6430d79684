"""Checkpoints you can trust: written atomically (a temporary file, fsync, rename, fsync of
the folder) with a sha256 beside them, several kept, and the newest *good* one found.

On-disk layout of a run folder (``--out-dir``)::

    checkpoint-000000120.pt          torch.save of the state dict (the global step in the name)
    checkpoint-000000120.pt.sha256   "<sha256>  checkpoint-000000120.pt", written after it
    checkpoint.pt                    the newest one (a hard link; a copy where links fail)
    checkpoint.pt.sha256

A checkpoint is a plain ``torch.save`` dictionary; the keys other tools read are stable:
``"model"`` (the trained module's state_dict: the classifier for fine-tuning, the
``BERTModel`` for pretraining), ``"config"`` (the run's options as a dict), ``"vocab"``
(``idx_to_token`` or None), ``"kind"`` (``"finetune"`` / ``"pretrain"``), ``"global_step"``,
``"epoch"``, ``"step_in_epoch"``.

:func:`load_checkpoint` is the one public reader: given a run folder it returns the newest
checkpoint whose checksum verifies (a corrupt or truncated one is reported, naming the
file, and the one before it is used); given a file it loads that file or fails naming it.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from .._fsync import fsync_dir as _fsync_dir

__all__ = ["load_checkpoint", "save_checkpoint", "find_checkpoints", "latest_checkpoint",
           "checkpoint_path", "remove_checkpoints", "CheckpointError", "LATEST_NAME"]

LATEST_NAME = "checkpoint.pt"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, truncated); names the file."""


def checkpoint_path(out_dir: str, global_step: int) -> str:
    return os.path.join(out_dir, f"checkpoint-{int(global_step):09d}.pt")


def _write_bytes(f, data: bytes) -> None:
    """One seam for the test that fills the disk (monkeypatched to raise ENOSPC)."""
    f.write(data)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            _write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            why = ("the disk is full" if e.errno == errno.ENOSPC else
                   e.strerror or str(e))
            raise OSError(e.errno, f"cannot write checkpoint {path}: {why}; the previous "
                                   "checkpoints are untouched") from e
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _link_latest(src: str, data: bytes, sidecar: bytes) -> None:
    folder = os.path.dirname(src)
    latest = os.path.join(folder, LATEST_NAME)
    tmp = f"{latest}.tmp.{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)          # same bytes, no second write
        os.replace(tmp, latest)
        _fsync_dir(folder)
    except OSError:
        _atomic_write(latest, data)
    _atomic_write(latest + ".sha256", sidecar)


def save_checkpoint(out_dir: str, state: Dict[str, Any], global_step: int,
                    keep: Optional[int] = None) -> str:
    """Write ``state`` as ``checkpoint-<step>.pt`` (+ ``.sha256``), point ``checkpoint.pt`` at
    it and keep the newest ``keep`` numbered checkpoints (None or 0: all).  Returns the path.
    An error while writing (a full disk) leaves every earlier checkpoint as it was."""
    os.makedirs(out_dir, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = checkpoint_path(out_dir, global_step)
    _atomic_write(path, data)
    sidecar = f"{digest}  {os.path.basename(path)}\n".encode()
    _atomic_write(path + ".sha256", sidecar)
    _link_latest(path, data, f"{digest}  {LATEST_NAME}\n".encode())
    if keep:
        for _, old in find_checkpoints(out_dir)[keep:]:
            for p in (old, old + ".sha256"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
    return path


def find_checkpoints(out_dir: str) -> List[Tuple[int, str]]:
    """``[(global_step, path), ...]`` of the numbered checkpoints in ``out_dir``, newest first
    (nothing is verified here)."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(out_dir), "checkpoint-*.pt")):
        m = _NUMBERED.match(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def remove_checkpoints(out_dir: str) -> List[str]:
    """Delete every checkpoint of ``out_dir`` (a fresh run starting there); returns them."""
    gone = []
    paths = [p for _, p in find_checkpoints(out_dir)] + [os.path.join(out_dir, LATEST_NAME)]
    for p in paths:
        for q in (p, p + ".sha256"):
            if os.path.lexists(q):
                os.unlink(q)
                gone.append(q)
    return gone


def _read_verified(path: str) -> Dict[str, Any]:
    """Load one checkpoint file, checking its ``.sha256`` when there is one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    with open(path, "rb") as f:
        data = f.read()
    sidecar = path + ".sha256"
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            want = f.read().split()
        got = hashlib.sha256(data).hexdigest()
        if not want or want[0] != got:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated: its sha256 is {got}, "
                f"{os.path.basename(sidecar)} says {want[0] if want else '(empty)'} "
                f"({len(data)} bytes)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({len(data)} bytes; corrupt or "
                              f"truncated?): {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a fastbert training checkpoint (no 'model' key)")
    return state


def latest_checkpoint(path: str, verbose: bool = True) -> Tuple[Optional[str],
                                                                 Optional[Dict[str, Any]]]:
    """``(file, state)`` of the newest checkpoint in the run folder ``path`` that verifies,
    or ``(None, None)`` when the folder holds none.  Bad ones are warned about, naming the
    file and why, and skipped.  Raises :class:`CheckpointError` when there are checkpoints
    but none is good."""
    candidates = [p for _, p in find_checkpoints(path)]
    if not candidates and os.path.isfile(os.path.join(path, LATEST_NAME)):
        candidates = [os.path.join(path, LATEST_NAME)]   # a single-file (older) run folder
    errors = []
    for p in candidates:
        try:
            state = _read_verified(p)
        except CheckpointError as e:
            errors.append(str(e))
            if verbose:
                warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
            continue
        return p, state
    if errors:
        raise CheckpointError(f"no usable checkpoint in {path}:\n  " + "\n  ".join(errors))
    return None, None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path``: a run folder (the newest complete, verified checkpoint in
    it; corrupt or truncated ones are skipped with a warning naming them) or one file (that
    file, verified against its ``.sha256`` when present).  Keys: see the module docstring.
    Raises :class:`CheckpointError` (a ``ValueError``) naming the file(s) when none is usable,
    ``FileNotFoundError`` when ``path`` does not exist."""
    if os.path.isdir(path):
        found, state = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path} (expected checkpoint-<step>.pt "
                                    f"or {LATEST_NAME})")
        return state
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return _read_verified(path)
