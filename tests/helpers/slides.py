"""Small slide files made for tests: a deterministic RGB pattern, a tiled pyramidal TIFF that
OpenSlide and tiffslide both open, and a copy with chosen JPEG tiles made undecodable."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import tifffile


def make_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Deterministic smooth-ish RGB test pattern (not constant, so misplacement shows)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=-1)
    img = img + rng.integers(0, 20, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiff_slide(
    path: Path,
    image: np.ndarray,
    mpp: float | None = 0.25,
    *,
    aperio: bool = True,
    app_mag: float | None = None,
    downsamples: tuple[int, ...] = (1, 4),
    tile: int = 256,
    resolution_unit: str = "CENTIMETER",
    compression: str | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF both OpenSlide and tiffslide open (Aperio-style if asked)."""
    h, w = image.shape[:2]
    desc = ""
    if aperio:
        fields = []
        if mpp is not None:
            fields.append(f"MPP = {mpp}")
        if app_mag is not None:
            fields.append(f"AppMag = {app_mag:g}")
        desc = f"Aperio Image Library v12.0.0\n{w}x{h} ({tile}x{tile}) RAW|" + "|".join(fields)
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, ds in enumerate(downsamples):
            level = image[::ds, ::ds] if ds > 1 else image
            kwargs = {}
            if mpp is not None and not aperio:
                factor = 10_000.0 if resolution_unit == "CENTIMETER" else 25_400.0
                kwargs = {"resolution": (factor / (mpp * ds), factor / (mpp * ds)),
                          "resolutionunit": resolution_unit}
            tw.write(
                np.ascontiguousarray(level), tile=(tile, tile), photometric="rgb",
                compression=compression, description=desc if i == 0 else None,
                metadata=None, subfiletype=0 if (aperio or i == 0) else 1, **kwargs,
            )
            if aperio and i == 0:
                # Aperio convention (tifffile/tiffslide rely on it): page 1 is a stripped
                # thumbnail, pyramid levels follow.
                tw.write(np.ascontiguousarray(image[::8, ::8]), photometric="rgb",
                         metadata=None, description="Aperio Image Library v12.0.0\nthumbnail")
    return path


def corrupt(src: Path, dst: Path, level: int, tiles: list[int] | None = None) -> tuple[Path, list[int]]:
    """Copy ``src`` to ``dst`` with ``tiles`` of ``level`` undecodable (default: its most textured,
    i.e. largest, tile, inside tissue); returns the path and the tile indices."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tf:
        page = tf.series[0].levels[level].pages[0]
        if tiles is None:
            tiles = [int(np.argmax(page.databytecounts))]
        offsets = [page.dataoffsets[i] for i in tiles]
    with open(dst, "r+b") as fh:
        for off in offsets:
            fh.seek(off + 2)
            assert fh.read(2) == b"\xff\xe0"  # APP0 right after SOI
            fh.seek(off + 3)
            fh.write(b"\x3f")
    return dst, tiles
