"""The model of a batch as workers see it: a small reference each worker process loads itself.

Nothing the batch needs lives on one worker alone. The client never scatters the model: a slide
task carries a :class:`ModelRef` (a path and the weights' SHA-256) and each worker process loads
the model from it once, into a cache keyed by that hash. A worker that is lost takes nothing with
it; its replacement, or any survivor, loads the same model from the same file.

Models that are not files (an ``nn.Module`` in memory, a registry name with random weights) are
written once by the client into the batch's output folder, which every worker already shares.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_cmaf.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = ["ModelRef", "make_model_ref", "load_model_ref", "cached_model_hashes"]

#: folder inside the batch output that holds models written for the workers
MODEL_DIR_NAME = ".wsi-cmaf-models"

_CACHE: dict[str, Any] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelRef:
    """Where a worker finds the batch's model and the hash it must have.

    ``kind`` is ``"path"`` (resolve ``path`` with ``config`` as :func:`resolve_model` does) or
    ``"pickle"`` (a resolved model the client saved with ``torch.save``).
    """

    kind: str
    path: str
    sha256: str
    config: str | None = None


def make_model_ref(resolved: Any, model: Any, model_config: Any, out_dir: Path) -> ModelRef:
    """A reference to ``resolved`` (resolved from ``model``/``model_config``) that workers can load."""
    from wsi_cmaf.infer.modelspec import quick_weights_sha256

    is_path = model is None or isinstance(model, str | Path)
    file_backed = is_path and quick_weights_sha256(model) == resolved.weights_sha256
    config_ok = model_config is None or isinstance(model_config, str | Path)
    if file_backed and config_ok:
        from wsi_cmaf.model_files import DEFAULT_MODEL_DIR

        path = DEFAULT_MODEL_DIR if model is None else Path(model)
        return ModelRef("path", str(path.resolve()), resolved.weights_sha256,
                        None if model_config is None else str(Path(model_config).resolve()))
    return ModelRef("pickle", str(_save_resolved(resolved, out_dir)), resolved.weights_sha256)


def _save_resolved(resolved: Any, out_dir: Path) -> Path:
    """Write ``resolved`` once as ``<out>/.wsi-cmaf-models/<sha256>.pt`` (atomically)."""
    import torch

    folder = Path(out_dir) / MODEL_DIR_NAME
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{resolved.weights_sha256}.pt"
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(resolved, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_model_ref(ref: ModelRef) -> Any:
    """The resolved model of ``ref``, loaded once per process and checked against its hash.

    Raises :class:`ModelError` when the file no longer holds the weights the batch started with.
    """
    with _LOCK:  # GPU workers run several slide tasks at once: load once, not once per thread
        hit = _CACHE.get(ref.sha256)
        if hit is not None:
            return hit
        resolved = _load(ref)
        if resolved.weights_sha256 != ref.sha256:
            raise ModelError(f"{ref.path}: the model's weights changed while the batch ran (sha256 "
                             f"{resolved.weights_sha256[:12]}, batch started with {ref.sha256[:12]}); "
                             "rerun the batch")
        _CACHE[ref.sha256] = resolved
        logger.info("loaded model %s on worker process %d", ref.sha256[:12], os.getpid())
        return resolved


def _load(ref: ModelRef) -> Any:
    from wsi_cmaf.infer.modelspec import resolve_model

    if ref.kind == "path":
        return resolve_model(ref.path, ref.config)
    if ref.kind != "pickle":
        raise ModelError(f"unknown model reference kind {ref.kind!r}")
    import torch

    if not Path(ref.path).is_file():
        raise ModelError(f"{ref.path}: the batch's model file is missing on this worker; the output "
                         "folder must be on a file system every worker shares")
    # A file this batch's client wrote into its own output folder (not user input): full unpickling
    # is needed because it holds the module object itself.
    return torch.load(ref.path, map_location="cpu", weights_only=False)


def cached_model_hashes() -> list[str]:
    """Hashes of the models this process has loaded (for tests and diagnostics)."""
    with _LOCK:
        return sorted(_CACHE)
