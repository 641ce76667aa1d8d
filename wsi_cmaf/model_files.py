"""The files of a saved model and the SHA-256 of its weights, without importing torch.

A batch rerun over a finished archive needs only the weights hash to compare with its status
table; keeping these names and that hash here lets ``wsi-cmaf batch`` answer such a rerun without
loading torch, timm or dask (see :mod:`wsi_cmaf.cluster.plan`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "WSINFER_WEIGHTS_NAME", "TORCHSCRIPT_SUFFIXES", "DEFAULT_MODEL_DIR",
           "sha256_file", "is_wsinfer_folder", "weights_file_sha256"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: WSInfer's model-zoo layout: config.json + a TorchScript file of this name
WSINFER_WEIGHTS_NAME = "torchscript_model.pt"
TORCHSCRIPT_SUFFIXES = {".pt", ".ts", ".torchscript", ".jit"}
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "weights" / "default"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_wsinfer_folder(path: str | Path) -> bool:
    """A folder with ``config.json`` + ``torchscript_model.pt`` (WSInfer's model-zoo layout)."""
    p = Path(path)
    return p.is_dir() and (p / WSINFER_WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file()


def weights_file_sha256(model: str | Path | None) -> str | None:
    """SHA-256 of the weights file a model path (or None: the default model) resolves to.

    None when no file tells: a registry name, a missing path, a folder without weights.
    """
    if model is None:
        return weights_file_sha256(DEFAULT_MODEL_DIR) if (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file() else None
    path = Path(model)
    if not path.exists():
        return None
    if path.suffix in TORCHSCRIPT_SUFFIXES or path.is_file():
        return sha256_file(path) if path.is_file() else None
    weights = path / WEIGHTS_NAME
    if not weights.is_file() and is_wsinfer_folder(path):
        weights = path / WSINFER_WEIGHTS_NAME
    return sha256_file(weights) if weights.is_file() else None
