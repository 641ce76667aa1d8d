"""Slide inference: ``analyze_slide`` and its pieces.

Exports load on first use (PEP 562): ``wsi_cmaf.infer.config`` alone must not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "InferenceConfig": "wsi_cmaf.infer.config",
    "SlideResult": "wsi_cmaf.infer.result",
    "analyze_slide": "wsi_cmaf.infer.pipeline",
    "default_output_dir": "wsi_cmaf.infer.pipeline",
}

__all__ = ["InferenceConfig", "SlideResult", "analyze_slide", "default_output_dir"]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
