"""The QC picture: thumbnail with the tissue outline, marker ink, out-of-focus and mostly-ink tiles."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from wsi_cmaf.qc.report import SlideQC
from wsi_cmaf.slide.grid import TileGrid
from wsi_cmaf.slide.tissue import TissueMask

#: colours: ink in magenta, out-of-focus tiles in red, mostly-ink tiles in orange
INK_RGBA = (1.0, 0.0, 1.0, 0.55)
BLUR_COLOUR = "red"
INK_TILE_COLOUR = "orange"


def _tile_boxes(grid: TileGrid, tiles: np.ndarray) -> np.ndarray:
    """(n, 5, 2) closed outlines in µm of the ``tiles`` of ``grid``."""
    size, step = grid.config.tile_size * grid.config.mpp, grid.config.step * grid.config.mpp
    rows, cols = np.nonzero(tiles)
    x0, y0 = cols * step, rows * step
    corners = [(x0, y0), (x0 + size, y0), (x0 + size, y0 + size), (x0, y0 + size), (x0, y0)]
    return np.stack([np.stack(c, 1) for c in corners], axis=1) if rows.size else np.zeros((0, 5, 2))


def write_picture(thumb: np.ndarray, extent_um: tuple[float, float], grid: TileGrid, mask: TissueMask,
                  qc: SlideQC, title: str, out: Path) -> Path:
    """Save the QC picture of one slide to ``out`` (PNG); ``extent_um`` is the slide's (width, height) in µm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    width, height = extent_um
    extent = (0, width, height, 0)
    fig, ax = plt.subplots(figsize=(9, 9 * height / width + 1.6), dpi=120)
    ax.imshow(thumb, extent=extent)
    m_extent = (0, mask.mask.shape[1] * mask.mpp, mask.mask.shape[0] * mask.mpp, 0)
    ax.contour(np.pad(mask.mask, 1).astype(float), levels=[0.5], colors=["#1f77b4"], linewidths=0.8,
               extent=(-mask.mpp, m_extent[1] + mask.mpp, m_extent[2] + mask.mpp, -mask.mpp), origin="upper")
    if mask.ink is not None and mask.ink.any():
        rgba = np.zeros(mask.ink.shape + (4,), np.float32)
        rgba[mask.ink] = INK_RGBA
        ax.imshow(rgba, extent=m_extent, interpolation="nearest")
    # list(): LineCollection takes an (N, 5, 2) array too, but its stubs type only a sequence of lines
    ax.add_collection(LineCollection(list(_tile_boxes(grid, qc.blurred)), colors=BLUR_COLOUR, linewidths=0.9))
    ax.add_collection(LineCollection(list(_tile_boxes(grid, qc.ink_tiles)), colors=INK_TILE_COLOUR, linewidths=0.9))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xlabel("µm")
    report = qc.to_dict()
    est = report["mpp_estimate"]
    meta = report["mpp_metadata"]
    lines = [title,
             f"µm/px used {report['mpp_used'][0]:.4g} ({report['mpp_source']}); metadata "
             f"{'none' if meta is None else f'{meta[0]:.4g}'}; estimated from nuclei "
             + ("not computed" if est is None else
                f"{est:.3g} ({report['mpp_estimate_interval'][0]:.3g}-{report['mpp_estimate_interval'][1]:.3g})"),
             f"ink {report['ink_fraction']:.1%} of tissue (magenta), {report['ink_tiles']} mostly-ink tiles (orange); "
             f"{report['blurred_tiles']} of {report['tissue_tiles']} tissue tiles out of focus (red)"]
    lines += [textwrap.shorten(f"! {w}", 160) for w in report["warnings"][:4]]
    ax.set_title("\n".join(lines), fontsize=7.5, loc="left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
