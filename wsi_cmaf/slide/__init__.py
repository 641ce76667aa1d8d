"""Slide engine: readers (OpenSlide / tiffslide / DICOM) and tissue detection.

Exports load on first use (PEP 562) so that ``wsi-cmaf --help`` and ``import wsi_cmaf.slide.reader``
do not pay for dask, scipy and scikit-image, which tissue detection pulls in.
"""

from __future__ import annotations

from wsi_cmaf._lazy import lazy_exports

_EXPORTS = {
    "BACKENDS": "wsi_cmaf.slide.reader",
    "SlideReader": "wsi_cmaf.slide.reader",
    "open_slide": "wsi_cmaf.slide.opener",
    "TissueConfig": "wsi_cmaf.slide.tissue",
    "TissueMask": "wsi_cmaf.slide.tissue",
    "detect_tissue": "wsi_cmaf.slide.tissue",
    "tissue_mask_from_rgb": "wsi_cmaf.slide.tissue",
    # Tiling and synthetic slides (helper "synth-grid").
    "Block": "wsi_cmaf.slide.grid",
    "BlockTiles": "wsi_cmaf.slide.grid",
    "GridConfig": "wsi_cmaf.slide.grid",
    "TileGrid": "wsi_cmaf.slide.grid",
    "read_block": "wsi_cmaf.slide.reads",
    "read_tile": "wsi_cmaf.slide.reads",
    "SyntheticSlide": "wsi_cmaf.slide.synthetic",
    "load_synthetic_slide": "wsi_cmaf.slide.synthetic",
    "load_tumour_mask": "wsi_cmaf.slide.synthetic",
    "write_synthetic_slide": "wsi_cmaf.slide.synthetic",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
