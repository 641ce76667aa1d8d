"""Where the heatmap's tiles lie on the slide (tile index <-> level-0 pixels <-> µm)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wsi_cmaf.output.ngff import PyramidGeometry


@dataclass(frozen=True)
class TileGeometry:
    """Placement of the tile grid on the slide.

    ``um_per_tile`` is (y, x); every level-0 pixel quantity is (x, y), as slide
    locations are. ``slide_mpp`` is None when the store does not know the slide's
    µm/px; then level-0 mappings are unavailable (:meth:`require_level0`).
    """

    um_per_tile: tuple[float, float]
    slide_mpp: tuple[float, float] | None = None
    origin_level0: tuple[float, float] = (0.0, 0.0)
    stride_level0: tuple[float, float] | None = None
    tile_level0: tuple[float, float] | None = None

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], um_per_tile: tuple[float, float]) -> TileGeometry:
        """Derive the geometry from the pipeline's attributes.

        Reads ``attrs["slide"]["mpp"]`` (x, y µm/px), ``attrs["grid"]["tile_origin_level0"]``
        (x, y of tile (0, 0)'s top-left) and ``attrs["grid"]["tile_size"]``/``["mpp"]``
        (tile edge in pixels at the grid's µm/px). Missing keys fall back to an origin at
        (0, 0) and tiles as large as the stride.

        A level-0 grid (WSInfer's lattice, :mod:`wsi_cmaf.slide.level0`) records
        ``attrs["grid"]["tile_size_level0"]`` (its square ``[P, P]`` patch): its tiles are then
        square, ``tile_size * mpp / mean(slide mpp)`` level-0 px on both axes (``grid["mpp"]`` is
        the effective ``P * mean / tile_size``). On square pixels the mean is the slide's µm/px, so
        this is bit-identical to the per-axis formula used for every other store; stores without
        the key (pyramid grids, stores made before it) keep that formula.
        """
        uy, ux = (float(v) for v in um_per_tile)
        slide = attrs.get("slide") or {}
        grid = attrs.get("grid") or {}
        mpp = slide.get("mpp")
        if mpp is None:
            return cls((uy, ux))
        mx, my = (float(v) for v in (mpp if np.ndim(mpp) else (mpp, mpp)))
        origin = tuple(float(v) for v in grid.get("tile_origin_level0", (0.0, 0.0)))
        stride = (ux / mx, uy / my)
        if "tile_size" in grid and "mpp" in grid:
            edge_um = float(grid["tile_size"]) * float(grid["mpp"])
            if grid.get("tile_size_level0") is not None:
                # P * mean µm: P level-0 px along both axes, also where mpp_x != mpp_y
                edge = edge_um / ((mx + my) / 2)
                tile = (edge, edge)
            else:
                tile = (edge_um / mx, edge_um / my)
        else:
            tile = stride
        return cls((uy, ux), (mx, my), (origin[0], origin[1]), stride, tile)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileGeometry:
        """Inverse of :meth:`to_dict`."""
        def pair(v):
            return None if v is None else (float(v[0]), float(v[1]))

        return cls(pair(d["um_per_tile"]), pair(d.get("slide_mpp")),
                   pair(d.get("origin_level0")) or (0.0, 0.0),
                   pair(d.get("stride_level0")), pair(d.get("tile_level0")))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (lists, not tuples)."""
        return {k: (None if v is None else [float(x) for x in v]) for k, v in asdict(self).items()}

    @property
    def has_level0(self) -> bool:
        """True when tile indices can be mapped to slide pixels."""
        return self.slide_mpp is not None and self.stride_level0 is not None

    def require_level0(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(slide (x, y) µm/px, (x, y) level-0 stride); :class:`~wsi_cmaf.errors.OutputError` when
        the store cannot map tiles to slide pixels."""
        from wsi_cmaf.errors import OutputError

        if self.slide_mpp is None or self.stride_level0 is None:
            raise OutputError("the store does not record the slide's µm/px (attrs['slide']['mpp']); "
                              "cannot map tiles to slide pixels")
        return self.slide_mpp, self.stride_level0

    def pyramid(self) -> PyramidGeometry:
        """NGFF placement: µm per heatmap pixel and the centre of tile (0, 0) in µm."""
        if self.slide_mpp is None or self.stride_level0 is None:  # not has_level0
            return PyramidGeometry(self.um_per_tile, (self.um_per_tile[0] / 2, self.um_per_tile[1] / 2))
        mx, my = self.slide_mpp
        tx, ty = self.tile_level0 or self.stride_level0
        cy = (self.origin_level0[1] + ty / 2) * my
        cx = (self.origin_level0[0] + tx / 2) * mx
        return PyramidGeometry(self.um_per_tile, (cy, cx))

    def tile_to_level0(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map (fractional) tile-centre indices to level-0 (x, y) pixels.

        Integer indices give tile centres; ``i ± 0.5`` gives the boundary between
        neighbouring tiles (the tile edge when stride == tile size).
        """
        _, stride = self.require_level0()
        tx, ty = self.tile_level0 or stride
        sx, sy = stride
        x = self.origin_level0[0] + tx / 2 + np.asarray(cols, dtype=float) * sx
        y = self.origin_level0[1] + ty / 2 + np.asarray(rows, dtype=float) * sy
        return x, y


def slide_size(attrs: dict[str, Any]) -> tuple[float, float] | None:
    """Level-0 (width, height) of the slide from a store's attributes, or None when unrecorded.

    Partial edge tiles reach past it; exported shapes are clipped to ``(0, 0, width, height)``.
    """
    size = (attrs.get("slide") or {}).get("size")
    if not size or len(size) != 2:
        return None
    return float(size[0]), float(size[1])
