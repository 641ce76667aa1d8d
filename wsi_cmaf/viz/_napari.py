"""napari plugin (npe2 manifest ``wsi_cmaf/napari.yaml``): reader and threshold widget.

The reader claims a folder only when it is a wsi-cmaf heatmap store (root attribute
``wsi_cmaf.format``), and slide files (``*.svs``, ``*.tif`` ...) only when napari routes them
here: other readers claim those extensions too, so napari asks the user or takes
``--plugin wsi-cmaf`` / ``viewer.open(..., plugin="wsi-cmaf")``. For any other path it returns
None, so napari tries the next reader.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wsi_cmaf.viz.layers import LayerData, layer_data

logger = logging.getLogger(__name__)

#: Slide file suffixes the reader accepts (lower case); the manifest lists the same patterns.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm")


def _kind(path: str | Path) -> str | None:
    """"store", "slide" or None (not ours) for one path."""
    from wsi_cmaf.output.store_layout import read_store_meta

    p = Path(str(path).rstrip("/\\"))
    if p.is_dir():
        if read_store_meta(p) is not None:
            return "store"
        return "slide" if any(p.glob("*.dcm")) else None  # a DICOM slide folder
    if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES):
        return "slide"
    return None


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: a function reading ``path`` if it is a wsi-cmaf store or a slide, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(_kind(p) is None for p in paths):
        return None
    return read


def read(path: str | Sequence[str]) -> list[LayerData]:
    """Layers of each path: a store with its recorded slide underneath, or a slide on its own."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        clean = str(p).rstrip("/\\")
        layers.extend(layer_data(store=clean) if _kind(clean) == "store" else layer_data(clean))
    return [(data, _napari_kwargs(kwargs, kind), kind) for data, kwargs, kind in layers]


def _napari_kwargs(kwargs: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """``kwargs`` plus the layer's units where this napari version has them (>= 0.6)."""
    import napari

    cls = getattr(napari.layers, layer_type.capitalize())
    out = dict(kwargs)
    units = ((kwargs.get("metadata") or {}).get("wsi_cmaf") or {}).get("units", "micrometer")
    if "units" in inspect.signature(cls.__init__).parameters and units != "pixel":
        out.setdefault("units", (units, units))
    return out


def add_layers(viewer: Any, layers: list[LayerData]) -> list[Any]:
    """Add LayerData tuples to ``viewer``, turn the scale bar on in µm, fit the view; the new layers."""
    added = []
    for data, kwargs, layer_type in layers:
        added.append(getattr(viewer, f"add_{layer_type}")(data, **_napari_kwargs(kwargs, layer_type)))
    if any(((k.get("metadata") or {}).get("wsi_cmaf") or {}).get("units", "micrometer") != "pixel"
           for _, k, _ in layers):
        viewer.scale_bar.visible = True
        if not any(hasattr(layer, "units") for layer in added):  # napari < 0.6: no per-layer units
            viewer.scale_bar.unit = "um"
    viewer.reset_view()
    return added


def threshold_widget() -> Any:
    """Dock widget: show a heatmap layer as a ramp or as the tiles at or above a threshold."""
    from magicgui import magic_factory
    from napari.layers import Image

    from wsi_cmaf.output import _draw
    from wsi_cmaf.viz.layers import heatmap_colormap

    def apply(layer: Image, mode: str = "ramp", threshold: float = 0.5) -> None:
        if layer is None:
            return
        if mode == "ramp":
            layer.colormap = heatmap_colormap()
            return
        r, g, b = (c / 255.0 for c in _draw.THRESHOLD_COLOUR)
        layer.colormap = {"name": f"wsi-cmaf >= {threshold:.2f}", "interpolation": "zero",
                          "colors": [[0, 0, 0, 0], [r, g, b, _draw.THRESHOLD_OPACITY]],
                          "controls": [0.0, float(threshold), 1.0]}
        layer.contrast_limits = (0.0, 1.0)

    # this module's annotations are strings (PEP 563); magicgui needs the layer type itself
    apply.__annotations__.update(layer=Image, mode=str, threshold=float, **{"return": None})
    factory = magic_factory(apply, auto_call=True, call_button=False,
                            mode={"choices": ["ramp", "threshold"]},
                            threshold={"widget_type": "FloatSlider", "min": 0.0, "max": 1.0, "step": 0.01})
    return factory()
