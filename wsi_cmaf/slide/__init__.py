"""Slide engine: readers (OpenSlide / tiffslide / DICOM) and tissue detection."""

from wsi_cmaf.slide.reader import BACKENDS, SlideReader, open_slide
from wsi_cmaf.slide.tissue import TissueConfig, TissueMask, detect_tissue, tissue_mask_from_rgb

__all__ = [
    "BACKENDS",
    "SlideReader",
    "TissueConfig",
    "TissueMask",
    "detect_tissue",
    "open_slide",
    "tissue_mask_from_rgb",
]

# Tiling and synthetic slides (helper "synth-grid").
from wsi_cmaf.slide.grid import Block, BlockTiles, GridConfig, TileGrid, read_block, read_tile  # noqa: E402
from wsi_cmaf.slide.synthetic import (  # noqa: E402
    SyntheticSlide,
    load_synthetic_slide,
    load_tumour_mask,
    write_synthetic_slide,
)

__all__ += [
    "Block", "BlockTiles", "GridConfig", "TileGrid", "read_block", "read_tile",
    "SyntheticSlide", "load_synthetic_slide", "load_tumour_mask", "write_synthetic_slide",
]
