"""Calibration of the out-of-focus threshold: band ratio of the tissue tiles of the real slides, and
of the CMU pixels with one quadrant blurred (σ = 2, 3 px). Prints a Markdown table.

    .venv/bin/python benchmarks/bench_qc_blur.py [SLIDE_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from wsi_cmaf.qc.blur import BLUR_THRESHOLD, blurred_tiles, tile_sharpness
from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide

SLIDES = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/data/slides"
GRID = GridConfig(mpp=1.0, tile_size=64)


def row(name: str, path: Path, mpp: float | None, quadrant: bool) -> None:
    with open_slide(path, mpp=mpp) as r:
        w0, h0 = r.level_dimensions[0]
        grid = TileGrid.from_slide(r, GRID, detect_tissue(r))
        s = tile_sharpness(r, grid)
        tile = GRID.tile_size * GRID.mpp / r.mpp[0]
    rows, cols = np.indices(grid.shape)
    parts = {"all": grid.tissue}
    if quadrant:
        parts = {"in focus": grid.tissue & ((cols * tile + tile <= w0 // 2) | (rows * tile + tile <= h0 // 2)),
                 "blurred quadrant": grid.tissue & (cols * tile >= w0 // 2) & (rows * tile >= h0 // 2)}
    for part, sel in parts.items():
        v = s[sel & np.isfinite(s)]
        flagged = blurred_tiles(s)[sel & np.isfinite(s)].mean()
        print(f"| {name} | {part} | {v.size} | {v.min():.2f} | {np.percentile(v, 5):.2f} | {np.median(v):.2f} | "
              f"{flagged:.1%} |")


def main() -> None:
    print(f"| slide | part | judged tiles | min | 5th pct | median | flagged (< {BLUR_THRESHOLD}) |")
    print("|---|---|---|---|---|---|---|")
    row("cmu_small_region.svs", SLIDES / "cmu_small_region.svs", None, False)
    row("tcga-cr-7395-01a-01-ts1.svs (--mpp 0.9)", SLIDES / "tcga-cr-7395-01a-01-ts1.svs", 0.9, False)
    row("small_dicom.dcm (--mpp 0.5)", SLIDES / "small_dicom.dcm", 0.5, False)
    with open_slide(SLIDES / "cmu_small_region.svs") as r:
        w, h = r.level_dimensions[0]
        rgb, mpp = r.read_region((0, 0), 0, (w, h)), r.mpp[0]
    with tempfile.TemporaryDirectory() as tmp:
        for sigma in (2.0, 3.0):
            img = rgb.copy()
            img[h // 2:, w // 2:] = np.clip(ndi.gaussian_filter(rgb[h // 2:, w // 2:].astype(np.float32),
                                                                (sigma, sigma, 0)) + 0.5, 0, 255).astype(np.uint8)
            out = Path(tmp) / f"blur{sigma:g}.tiff"
            tifffile.imwrite(out, img, tile=(256, 256), photometric="rgb", compression="zlib",
                             resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
            row(f"cmu, quadrant σ = {sigma:g} px", out, None, True)


if __name__ == "__main__":
    main()
