"""wsi-cmaf: whole-slide image analysis for breast cancer histopathology.

Heavy submodules (torch, OpenSlide, dask) load lazily so ``import wsi_cmaf`` stays cheap.
"""

from __future__ import annotations

from wsi_cmaf._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "open_slide": "wsi_cmaf.slide.reader",
    "detect_tissue": "wsi_cmaf.slide.tissue",
    "TileGrid": "wsi_cmaf.slide.grid",
    "write_synthetic_slide": "wsi_cmaf.slide.synthetic",
    "create_model": "wsi_cmaf.models",
    "load_model": "wsi_cmaf.models",
    "analyze_slide": "wsi_cmaf.infer",
    "InferenceConfig": "wsi_cmaf.infer.config",
    "SlideResult": "wsi_cmaf.infer",
    "analyze_slides": "wsi_cmaf.cluster",
    "open_heatmap": "wsi_cmaf.output.heatmap",
    "tile_table": "wsi_cmaf.output.tiles",
}

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
