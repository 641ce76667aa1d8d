"""Look at results in napari: the slide in µm with its heatmap overlaid exactly.

``show(slide, store)`` opens a napari viewer from Python; the npe2 plugin (``napari.yaml``,
installed with ``pip install 'wsi-cmaf[napari]'``) lets ``napari store.zarr`` do the same.
:func:`layer_data` builds the layers without napari (pure numpy/dask), for tests and for other
viewers. napari itself is imported only by :func:`show` and the plugin.
"""

from __future__ import annotations

from wsi_cmaf._lazy import lazy_exports

_EXPORTS = {
    "show": "wsi_cmaf.viz.viewer",
    "layer_data": "wsi_cmaf.viz.layers",
    "slide_layer": "wsi_cmaf.viz.layers",
    "heatmap_layers": "wsi_cmaf.viz.layers",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
