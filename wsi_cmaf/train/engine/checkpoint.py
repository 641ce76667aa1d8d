"""Crash-safe training checkpoints.

Layout under ``<output_dir>/checkpoints``::

    epoch-0007/weights.safetensors   model (+ stage-1 heads, prefixed ``_stage_heads.``)
    epoch-0007/state.pt              optimizer / scheduler / scaler state and counters
    last.json                        {"dir": "epoch-0007", "epoch": 7, ...}

A checkpoint directory is written under a temporary name and renamed when complete, then
``last.json`` is replaced atomically (``os.replace``); a crash at any moment leaves either the
previous or the new checkpoint referenced, never a half-written one. ``state.pt`` holds only
tensors, numbers, strings, lists and dicts and is loaded with ``torch.load(weights_only=True)``:
nothing is unpickled. Weights are safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from wsi_cmaf.errors import ConfigError

logger = logging.getLogger(__name__)

POINTER = "last.json"
WEIGHTS = "weights.safetensors"
STATE = "state.pt"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path,
    epoch: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    info: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``epoch`` and point ``last.json`` at it; keep the newest ``keep`` ones."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    if final.exists():  # re-running an epoch after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / POINTER, json.dumps({"dir": name, "epoch": epoch, **info}, indent=2))
    olds = sorted(p for p in root.glob("epoch-*") if p.is_dir() and p.name != name)
    for old in olds[: max(len(olds) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The ``last.json`` record (with ``path``), or None when the run has no checkpoint yet."""
    pointer = Path(directory) / POINTER
    if not pointer.is_file():
        return None
    record = json.loads(pointer.read_text(encoding="utf-8"))
    record["path"] = Path(directory) / record["dir"]
    if not (record["path"] / WEIGHTS).is_file():
        raise ConfigError(f"{pointer} names {record['dir']}, which is missing; the run folder was edited")
    return record


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and state of one checkpoint directory (no unpickling)."""
    path = Path(path)
    tensors = load_file(str(path / WEIGHTS))
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    return tensors, state


def replace_dir(src: Path, dest: Path) -> None:
    """Move the finished folder ``src`` to ``dest``, replacing ``dest`` with at most a brief gap."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
