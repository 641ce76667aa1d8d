"""What made a result: code version, library versions, device and command line.

Every ``results.json`` (and ``protocol.json``) a protocol writes carries :func:`provenance` under
the key ``"provenance"``, so a committed table can be traced to the commit and the environment that
produced it, and a rerun can be compared like for like.
"""

from __future__ import annotations

import importlib
import logging
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: the repository this package was imported from (an installed wheel has no .git: "unknown")
_REPO = Path(__file__).resolve().parents[3]
_LIBRARIES = ("torch", "timm", "numpy")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=20,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("git %s failed: %s", args, exc)
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``{"commit": sha or "unknown", "dirty": bool | None}``; dirty = tracked files differ from the commit."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _version(name: str) -> str:
    """The imported module's ``__version__`` (torch's carries its build, e.g. ``+cu130``)."""
    try:
        return str(importlib.import_module(name).__version__)
    except (ImportError, AttributeError):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"


def device_description(device: Any = None) -> str:
    """The device results were computed on: the GPU's name, else the CPU and torch's thread count."""
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    cpu = platform.processor() or platform.machine()
    return f"cpu: {cpu}, {torch.get_num_threads()} torch thread(s)"


def provenance(device: Any = None, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Git commit (+ dirty), python / torch / timm / numpy versions, device, platform, command line.

    ``command``: the argument vector to record (default ``sys.argv``, the process that runs this).
    """
    argv = list(command) if command is not None else list(sys.argv)
    return {
        **git_state(),
        "python": platform.python_version(),
        **{name: _version(name) for name in _LIBRARIES},
        "device": device_description(device),
        "platform": platform.platform(),
        "command": shlex.join(argv),
    }
