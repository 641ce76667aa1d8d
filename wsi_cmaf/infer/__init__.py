"""Slide inference: ``analyze_slide`` and its pieces.

Exports load on first use (PEP 562): ``wsi_cmaf.infer.config`` alone must not import torch.
"""

from __future__ import annotations

from wsi_cmaf._lazy import lazy_exports

_EXPORTS = {
    "InferenceConfig": "wsi_cmaf.infer.config",
    "SlideResult": "wsi_cmaf.infer.result",
    "analyze_slide": "wsi_cmaf.infer.pipeline",
    "default_output_dir": "wsi_cmaf.infer.pipeline",
}

__all__ = ["InferenceConfig", "SlideResult", "analyze_slide", "default_output_dir"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
