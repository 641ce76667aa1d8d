"""``wsi-cmaf tiles``: tissue tile grid of a slide, with an optional preview PNG."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from wsi_cmaf.cli.qc import MPP_HINT as MPP_HINT  # this verb's advice for a slide without µm/px
from wsi_cmaf.cli.qc import mpp_value

VERB = "tiles"
HELP = "show the tissue tile grid of a slide (tiles, blocks, level) and optionally save a preview PNG"

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("slide", help="slide file (SVS, TIFF, NDPI, MRXS, DICOM ...)")
    p.add_argument("--tile-mpp", type=float, default=4.0, help="tile µm/px (default 4.0)")
    p.add_argument("--size", type=int, default=50, help="tile size in px at --tile-mpp (default 50)")
    p.add_argument("--stride", type=int, default=None, help="px between tile origins (default: --size)")
    p.add_argument("--threshold", type=float, default=0.5, help="min tissue fraction of a tile (default 0.5)")
    p.add_argument("--block-tiles", type=int, default=32, help="tiles per block side (default 32)")
    p.add_argument("--mpp", type=mpp_value, default=None,
                   help="override the slide's level-0 µm/px, or 'estimate' to measure it from the nuclei")
    p.add_argument("--backend", default="auto", help="auto | openslide | tiffslide | wsidicom")
    p.add_argument("--preview", type=Path, default=None, help="write a PNG: tissue mask and grid over the thumbnail")


def _preview(reader, grid, tissue, out: Path) -> None:
    """Thumbnail with the tissue mask tinted and tissue tiles / blocks outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap

    w0, h0 = reader.level_dimensions[0]
    mx, my = reader.mpp
    width_um, height_um = w0 * mx, h0 * my
    thumb_mpp = max(width_um, height_um) / 1600.0  # ~1600 px on the long side
    thumb = reader.thumbnail(max(thumb_mpp, min(mx, my)))
    extent = (0, width_um, height_um, 0)
    fig, ax = plt.subplots(figsize=(10, 10 * height_um / width_um + 0.5), dpi=150)
    ax.imshow(thumb, extent=extent)
    ax.imshow(tissue.mask, extent=extent, cmap=ListedColormap([(0, 0, 0, 0), (0.1, 0.6, 1.0, 0.25)]),
              interpolation="nearest")
    tile_um, step_um = grid.config.tile_size * grid.config.mpp, grid.config.step * grid.config.mpp
    rows, cols = np.nonzero(grid.tissue)
    x0, y0 = cols * step_um, rows * step_um
    if rows.size <= 40_000:  # individual tiles are unreadable beyond that; blocks still show
        segs = np.stack([np.stack([x0, y0], 1), np.stack([x0 + tile_um, y0], 1),
                         np.stack([x0 + tile_um, y0 + tile_um], 1), np.stack([x0, y0 + tile_um], 1),
                         np.stack([x0, y0], 1)], axis=1)
        # list(): LineCollection takes an (N, 5, 2) array too, but its stubs type only a sequence of lines
        ax.add_collection(LineCollection(list(segs), colors="lime", linewidths=0.2))
    block_um = grid.config.block_tiles * step_um
    for block in grid.blocks:
        by, bx = block.index
        ax.add_patch(plt.Rectangle((bx * block_um, by * block_um), block_um, block_um,
                                   fill=False, edgecolor="orange", linewidth=0.8))
    ax.set_xlim(0, width_um)
    ax.set_ylim(height_um, 0)
    ax.set_title(f"{reader.path.name}: {grid.n_tissue} tissue tiles of {grid.config.tile_size} px at "
                 f"{grid.config.mpp:g} µm/px, {len(grid.blocks)} blocks")
    ax.set_xlabel("µm")
    ax.set_ylabel("µm")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Build the grid and print a summary."""
    from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide

    config = GridConfig(mpp=args.tile_mpp, tile_size=args.size, stride=args.stride,
                        tissue_threshold=args.threshold, block_tiles=args.block_tiles)
    with open_slide(args.slide, backend=args.backend, mpp=args.mpp) as reader:
        tissue = detect_tissue(reader)
        grid = TileGrid.from_slide(reader, config, tissue)
        n_rows, n_cols = grid.shape
        print(f"slide: {reader.path} ({reader.backend}, level-0 {reader.mpp[0]:.4g} µm/px, {reader.mpp_source})")
        print(f"level: {grid.level} (downsample {grid.level_downsample:g}, "
              f"{'crop' if grid.exact else 'read + resize'})")
        print(f"grid: {n_rows} x {n_cols} tiles of {config.tile_size} px at {config.mpp:g} µm/px, "
              f"stride {config.step} px (partial edge tiles dropped)")
        print(f"tissue tiles: {grid.n_tissue} of {n_rows * n_cols} (tissue {tissue.fraction():.1%} of slide)")
        print(f"marker ink: {tissue.ink_fraction():.1%} of tissue + ink, {int(grid.ink_tiles.sum())} mostly-ink tiles "
              "left out")
        print(f"blocks: {len(grid.blocks)} with tissue of {grid.n_block_rows * grid.n_block_cols} "
              f"({config.block_tiles} x {config.block_tiles} tiles each)")
        if args.preview is not None:
            _preview(reader, grid, tissue, args.preview)
            print(f"preview: {args.preview}")
    return 0
