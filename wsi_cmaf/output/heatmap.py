"""The heatmap as a labelled xarray.DataArray: dims (class, y, x), coordinates in µm."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_cmaf.errors import OutputError
from wsi_cmaf.output.store import HeatmapStore

if TYPE_CHECKING:
    import xarray


def open_heatmap(store: HeatmapStore | str | Path, level: int = 0, task: str | None = None) -> xarray.DataArray:
    """Probabilities of pyramid ``level`` as a DataArray ``probability`` with dims (class, y, x).

    ``task`` picks another task of a multi-task model's store (its ``tasks/<task>`` group, with
    that task's class names); None (or the primary task's name) gives the main image. An unknown
    task raises :class:`~wsi_cmaf.errors.OutputError` naming the store's tasks.

    ``y``/``x`` are the µm positions of the pixel (tile) centres in slide coordinates (origin
    at the slide's top-left corner), the same as the store's NGFF transforms; ``class`` holds
    the class names; a ``tissue`` (y, x) coordinate marks tissue tiles. NaN = no value (no
    tissue, failed block). Attributes carry the store path, model and slide provenance.
    """
    import xarray as xr

    store = store if isinstance(store, HeatmapStore) else HeatmapStore.open(store)
    if level < 0 or level >= store.n_levels:
        raise OutputError(f"{store.path} has pyramid levels 0..{store.n_levels - 1}, not {level}")
    probs = store.probabilities(level, task)
    pyr = store.geometry.pyramid()
    _, sy, sx = pyr.scale(level)
    _, ty, tx = pyr.translation(level)
    ny, nx = probs.shape[1:]
    attrs = store.attrs
    meta = {"long_name": "class probability", "units": "1", "store": str(store.path.absolute()),
            "level": int(level), "um_per_pixel": [float(sy), float(sx)],
            "model": (attrs.get("model") or {}).get("name"),
            "weights_sha256": (attrs.get("model") or {}).get("weights_sha256"),
            "weights_note": (attrs.get("model") or {}).get("weights_note"),
            "slide": (attrs.get("slide") or {}).get("path"),
            "slide_fingerprint": store.identity.get("slide_fingerprint"),
            "task": task if task is not None else store.primary_task}
    return xr.DataArray(
        probs, dims=("class", "y", "x"), name="probability",
        coords={"class": store.task_class_names(task),
                "y": ("y", ty + sy * np.arange(ny), {"units": "µm", "long_name": "tile centre y"}),
                "x": ("x", tx + sx * np.arange(nx), {"units": "µm", "long_name": "tile centre x"}),
                "tissue": (("y", "x"), store.tissue(level))},
        attrs={k: v for k, v in meta.items() if v is not None},  # None is not a netCDF attribute value
    )
