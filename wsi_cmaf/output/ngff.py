"""OME-Zarr (NGFF 0.5) metadata for the heatmap store.

Only JSON builders live here, so the layout rules of the spec are in one place:
attributes sit under the ``"ome"`` key with ``"version": "0.5"``; each dataset has
exactly one ``scale`` followed by at most one ``translation``; a label image has the
same number of levels and dimensions as its source image and integer pixels.
See https://ngff.openmicroscopy.org/0.5/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NGFF_VERSION = "0.5"
AXES: tuple[str, ...] = ("c", "y", "x")


@dataclass(frozen=True)
class PyramidGeometry:
    """Physical placement of heatmap pixels.

    ``um_per_tile`` is the (y, x) physical distance between two neighbouring heatmap
    pixels at level 0 (tile stride × µm/px); ``centre_um`` is the (y, x) position in µm
    of the centre of tile (0, 0) in slide coordinates (origin = slide's top-left corner).
    """

    um_per_tile: tuple[float, float]
    centre_um: tuple[float, float]

    def scale(self, level: int) -> list[float]:
        """NGFF ``scale`` of pyramid ``level`` (channel axis unscaled)."""
        f = 2 ** level
        return [1.0, float(self.um_per_tile[0] * f), float(self.um_per_tile[1] * f)]

    def translation(self, level: int) -> list[float]:
        """NGFF ``translation`` of ``level``: centre of its pixel (0, 0) in µm.

        A level-``l`` pixel pools tiles ``0 .. 2**l - 1``, so its centre sits
        ``(2**l - 1) / 2`` strides after the centre of tile 0.
        """
        shift = (2 ** level - 1) / 2.0
        return [0.0,
                float(self.centre_um[0] + shift * self.um_per_tile[0]),
                float(self.centre_um[1] + shift * self.um_per_tile[1])]


def axes_metadata(channel_type: str = "channel") -> list[dict[str, str]]:
    """Axes ``c, y, x``; spatial axes in micrometres."""
    return [
        {"name": "c", "type": channel_type},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]


def multiscales_metadata(
    name: str, n_levels: int, geometry: PyramidGeometry, *, method: str, description: str
) -> list[dict[str, Any]]:
    """The ``multiscales`` list for a pyramid stored in arrays ``"0" .. str(n_levels - 1)``."""
    datasets = [
        {
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": geometry.scale(level)},
                {"type": "translation", "translation": geometry.translation(level)},
            ],
        }
        for level in range(n_levels)
    ]
    return [{
        "name": name,
        "axes": axes_metadata(),
        "datasets": datasets,
        "type": method,
        "metadata": {"description": description, "downscale": 2},
    }]


def image_metadata(
    class_names: list[str], n_levels: int, geometry: PyramidGeometry, name: str = "class_probabilities"
) -> dict[str, Any]:
    """The ``"ome"`` attribute of a probability image group (``name``: the main image's by default,
    ``<task>_probabilities`` for an extra task's group)."""
    channels = [
        {
            "label": label, "active": i == len(class_names) - 1, "color": _COLOURS[i % len(_COLOURS)],
            "coefficient": 1, "family": "linear", "inverted": False,
            "window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0},
        }
        for i, label in enumerate(class_names)
    ]
    return {
        "version": NGFF_VERSION,
        "multiscales": multiscales_metadata(
            name, n_levels, geometry, method="nan_mean",
            description="2x2 mean pooling ignoring NaN (NaN = no tissue tile / not computed)",
        ),
        "omero": {"name": name, "channels": channels,
                  "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0}},
    }


def labels_group_metadata(names: list[str]) -> dict[str, Any]:
    """The ``"ome"`` attribute of the ``labels`` group."""
    return {"version": NGFF_VERSION, "labels": list(names)}


def label_image_metadata(name: str, n_levels: int, geometry: PyramidGeometry) -> dict[str, Any]:
    """The ``"ome"`` attribute of a binary label image (0 = background, 1 = ``name``)."""
    return {
        "version": NGFF_VERSION,
        "image-label": {
            "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]},
                       {"label-value": 1, "rgba": [0, 160, 0, 128]}],
            "properties": [{"label-value": 0, "class": "background"},
                           {"label-value": 1, "class": name}],
            "source": {"image": "../../"},
        },
        "multiscales": multiscales_metadata(
            name, n_levels, geometry, method="max",
            description="2x2 max pooling (a coarse pixel is tissue if any of its tiles is)",
        ),
    }


# Hex colours of the first channels (omero display hints only).
_COLOURS = ("0000FF", "FF0000", "00FF00", "FFFF00", "FF00FF", "00FFFF")
