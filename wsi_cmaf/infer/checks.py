"""Cheap checks of ``analyze_slide``'s arguments, run before the model loads or any output exists."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from wsi_cmaf.device import resolve_device
from wsi_cmaf.errors import ConfigError, DeviceUnavailableError, OutputNotADirectoryError

if TYPE_CHECKING:
    import torch


def check_inputs(slide_path: Path, out_dir: Path) -> None:
    """Named errors for a missing/empty/folder slide or an output folder that is a file.

    Costs a few ``stat`` calls: run before the model loads and before any output exists.
    """
    from wsi_cmaf.slide.reader import _check_path  # the reader's own path rules, without opening

    _check_path(slide_path)
    for parent in (out_dir, *out_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise OutputNotADirectoryError(f"output folder {out_dir}: {parent} is a file, not a folder; "
                                               "give a folder path (it is created if missing)")
            break


def check_device(device: str) -> torch.device:
    """The torch device for ``device``; :class:`DeviceUnavailableError` when this machine lacks it."""
    try:
        return resolve_device(device)
    except ConfigError as exc:
        raise DeviceUnavailableError(f"--device {device}: {exc}") from exc
