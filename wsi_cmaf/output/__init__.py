"""Outputs of slide inference: the OME-Zarr heatmap store, overlay PNGs and GeoJSON regions.

Imports are lazy so that writing a store never pays for importing PIL, shapely, pandas or xarray.
"""

from __future__ import annotations

from wsi_cmaf._lazy import lazy_exports

_EXPORTS = {
    "HeatmapStore": "wsi_cmaf.output.store",
    "TileGeometry": "wsi_cmaf.output.geometry",
    "overlay": "wsi_cmaf.output.overlay",
    "render_overlay": "wsi_cmaf.output.overlay",
    "regions_geojson": "wsi_cmaf.output.geojson",
    "write_geojson": "wsi_cmaf.output.geojson",
    "open_heatmap": "wsi_cmaf.output.heatmap",
    "tile_table": "wsi_cmaf.output.tiles",
    "tiles_geojson": "wsi_cmaf.output.tiles",
    "write_tiles": "wsi_cmaf.output.tiles",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
