"""Synthetic H&E-like whole-slide images, written as Aperio-style pyramidal TIFFs.

The file layout follows Aperio SVS so that OpenSlide (vendor ``aperio``) and tiffslide open it
the same way and agree on µm/px:

* page 0: level 0, tiled, JPEG (YCbCr 2x2), ImageDescription ``"Aperio Image Library ...|MPP = ..."``;
* page 1: a stripped thumbnail (OpenSlide and tifffile both expect it there);
* pages 2..: reduced levels, tiled, top-level pages with ``subfiletype=0`` (OpenSlide ignores
  SubIFD pyramids; tiffslide treats other subfile types as associated images).

Every page also carries µm/px in XResolution/YResolution (ResolutionUnit = centimetre).
``metadata=None`` keeps tifffile from writing its own description first.

Pixels are rendered procedurally per tile (see :mod:`wsi_cmaf.slide._synthetic_render`) by a
generator handed to tifffile, so memory does not grow with slide size. Reduced levels are
rendered from the same coarse fields and block-averaged texture banks as level 0 (not by
downsampling level 0), which keeps the cost per level proportional to its pixel count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from wsi_cmaf.slide import _synthetic_render as render

logger = logging.getLogger(__name__)

__all__ = ["SyntheticSlide", "write_synthetic_slide", "load_synthetic_slide", "load_tumour_mask", "auto_downsamples"]

THUMBNAIL_MAX_SIDE = 1024


@dataclass
class SyntheticSlide:
    """What :func:`write_synthetic_slide` wrote.

    ``tumour_mask`` is the ground truth (tumour *and* tissue) sampled at the centres of a grid
    of ``mask_mpp`` µm/px pixels anchored at the slide's top-left corner; its shape is
    ``(ceil(height * mpp / mask_mpp), ceil(width * mpp / mask_mpp))``.
    """

    path: Path
    width: int
    height: int
    mpp: float
    tumour_mask: np.ndarray
    mask_mpp: float
    mask_path: Path | None
    downsamples: tuple[int, ...]
    tile: int
    seed: int
    seconds: float = 0.0


def auto_downsamples(width: int, height: int, min_side: int = 1024) -> tuple[int, ...]:
    """Aperio-like downsamples 1, 4, 16, ... until the smallest level's short side is <= ``min_side``."""
    ds = [1]
    while min(width, height) / ds[-1] > min_side:
        ds.append(ds[-1] * 4)
    return tuple(ds)


def _validate(width: int, height: int, mpp: float, tile: int, downsamples: tuple[int, ...], quality: int) -> None:
    if width < 16 or height < 16:
        raise ValueError(f"slide must be at least 16 x 16 px, got {width} x {height}")
    if not (0 < mpp < 100):
        raise ValueError(f"mpp must be a positive µm/px value, got {mpp}")
    if tile % 16 or tile < 16:
        raise ValueError(f"tile must be a positive multiple of 16 (JPEG 2x2 subsampling), got {tile}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if not downsamples or downsamples[0] != 1:
        raise ValueError(f"downsamples must start with 1, got {downsamples}")
    for d in downsamples:
        if d < 1 or d & (d - 1):
            raise ValueError(f"downsamples must be powers of two, got {downsamples}")
    if list(downsamples) != sorted(set(downsamples)):
        raise ValueError(f"downsamples must be strictly increasing, got {downsamples}")


def _description(width: int, height: int, level_w: int, level_h: int, tile: int, quality: int,
                 mpp: float, seed: int, kind: str) -> str:
    header = "Aperio Image Library v12.0.16 (wsi-cmaf synthetic)\r\n"
    if kind == "base":
        geometry = f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    elif kind == "thumbnail":
        geometry = f"{width}x{height} -> {level_w}x{level_h} - "
    else:
        geometry = (f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) -> {level_w}x{level_h} "
                    f"JPEG/RGB Q={quality}")
    fields = [
        geometry,
        f"AppMag = {10.0 / mpp:g}",
        f"MPP = {mpp:.6g}",
        "ScanScope ID = SYNTHETIC",
        f"Filename = wsi-cmaf-synthetic-seed{seed}",
    ]
    return header + "|".join(fields)


class _Renderer:
    """Tile source for one slide: deterministic in (seed, level, tile row, tile col)."""

    def __init__(self, width: int, height: int, mpp: float, seed: int, tumour: bool, blank: bool, tile: int):
        self.width, self.height, self.mpp, self.seed, self.tile = width, height, mpp, seed, tile
        self.fields = render.make_fields(width, height, seed, tumour, blank)
        rng = np.random.default_rng([seed, 0x4015E])
        # Pixel noise bank: each tile takes a window at a hashed offset (cheap, deterministic).
        self.noise = rng.normal(0.0, 2.0, size=(2 * tile, 2 * tile)).astype(np.float32)
        self.background = np.clip(render.BACKGROUND + self.noise[:tile, :tile, None], 0, 255).astype(np.uint8)

    def tile_at(self, level_d: int, ty: int, tx: int) -> np.ndarray:
        """Render tile (ty, tx) of the level with downsample ``level_d``."""
        t = self.tile
        h = int(render.hash_u64(self.seed, np.array([ty]), np.array([tx]), 1000 + level_d)[0])
        oy, ox = h % t, (h >> 20) % t
        out = render.render_tile(self.fields, self.seed, self.mpp, level_d, ty * t, tx * t, t,
                                 self.noise[oy:oy + t, ox:ox + t])
        return self.background if out is None else out

    def iter_level(self, level_d: int, level_w: int, level_h: int, workers: int) -> Iterator[np.ndarray]:
        """Tiles of one level in row-major order; ``workers`` > 1 renders ahead in threads."""
        coords = [(ty, tx) for ty in range(-(-level_h // self.tile)) for tx in range(-(-level_w // self.tile))]
        if workers <= 1:
            for ty, tx in coords:
                yield self.tile_at(level_d, ty, tx)
            return
        with ThreadPoolExecutor(workers) as pool:
            # Bounded look-ahead keeps memory flat: at most 4 * workers tiles in flight.
            window = 4 * workers
            futures = [pool.submit(self.tile_at, level_d, *c) for c in coords[:window]]
            for i in range(len(coords)):
                if i + window < len(coords):
                    futures.append(pool.submit(self.tile_at, level_d, *coords[i + window]))
                yield futures[i].result()
                futures[i] = None  # type: ignore[call-overload]

    def render_level(self, level_d: int, level_w: int, level_h: int) -> np.ndarray:
        """A whole (small) level in memory; only used for the thumbnail."""
        t = self.tile
        rows, cols = -(-level_h // t), -(-level_w // t)
        out = np.empty((rows * t, cols * t, 3), dtype=np.uint8)
        for ty in range(rows):
            for tx in range(cols):
                out[ty * t:(ty + 1) * t, tx * t:(tx + 1) * t] = self.tile_at(level_d, ty, tx)
        return out[:level_h, :level_w]

    def tumour_mask(self, mask_mpp: float) -> np.ndarray:
        """Ground truth at ``mask_mpp`` (row strips keep the float temporaries small)."""
        step = mask_mpp / self.mpp  # level-0 px per mask px
        mh, mw = math.ceil(self.height / step), math.ceil(self.width / step)
        mask = np.zeros((mh, mw), dtype=bool)
        strip = 1024
        for y0 in range(0, mh, strip):
            h = min(strip, mh - y0)
            tis = render.sample_field(self.fields.tissue, y0, 0, h, mw, step) > 0
            tum = render.sample_field(self.fields.tumour, y0, 0, h, mw, step) > 0
            mask[y0:y0 + h] = tis & tum
        return mask


def write_synthetic_slide(
    path: str | Path,
    width: int = 8192,
    height: int = 6144,
    mpp: float = 0.25,
    *,
    seed: int = 0,
    tumour: bool = True,
    tile: int = 512,
    downsamples: tuple[int, ...] | None = None,
    quality: int = 90,
    blank: bool = False,
    mask_mpp: float = 4.0,
    save_mask: bool = True,
    workers: int = 1,
) -> SyntheticSlide:
    """Write an H&E-like pyramidal Aperio-style TIFF and return its tumour ground truth.

    Args:
        path: output file (``.tiff`` or ``.svs``); parent folders are created.
        width, height: level-0 size in px.
        mpp: level-0 µm/px (isotropic); AppMag is written as ``10 / mpp``.
        seed: every pixel is a pure function of the seed and its coordinates.
        tumour: add tumour regions (denser, darker, larger irregular nuclei).
        tile: TIFF tile side in px (multiple of 16).
        downsamples: powers of two starting at 1; default :func:`auto_downsamples` (1, 4, 16, ...).
        quality: JPEG quality.
        blank: write background only (no tissue, no tumour) for tissue-detection tests.
        mask_mpp: µm/px of the returned/saved ground-truth mask (4.0 = one pixel per default tile).
        save_mask: also write ``<stem>_tumour_mask.png`` and ``<stem>_tumour_mask.json`` beside the slide.
        workers: threads rendering tiles ahead of the writer (tifffile encodes in its own threads).
    """
    start = time.perf_counter()
    path = Path(path)
    width, height = int(width), int(height)
    downsamples = tuple(int(d) for d in (downsamples or auto_downsamples(width, height)))
    _validate(width, height, mpp, tile, downsamples, quality)
    if mask_mpp <= 0:
        raise ValueError(f"mask_mpp must be positive, got {mask_mpp}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rend = _Renderer(width, height, float(mpp), seed, tumour, blank, tile)
    dims = [(max(1, width // d), max(1, height // d)) for d in downsamples]

    # The thumbnail comes from the coarsest level, which is small by construction.
    coarse = rend.render_level(downsamples[-1], *dims[-1])
    scale = min(1.0, THUMBNAIL_MAX_SIDE / max(coarse.shape[:2]))
    thumb_size = (max(1, round(coarse.shape[1] * scale)), max(1, round(coarse.shape[0] * scale)))
    thumb = np.asarray(Image.fromarray(coarse).resize(thumb_size, Image.Resampling.LANCZOS))
    del coarse

    bigtiff = width * height * 3 > 2**31  # JPEG is ~10x smaller, but stay safe past 4 GiB offsets
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                  resolutionunit="CENTIMETER", metadata=None, subfiletype=0)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for index, (d, (lw, lh)) in enumerate(zip(downsamples, dims)):
            res = 1e4 / (mpp * d)  # pixels per centimetre
            kind = "base" if index == 0 else "level"
            tw.write(
                rend.iter_level(d, lw, lh, workers), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                resolution=(res, res), maxworkers=max(1, workers),
                description=_description(width, height, lw, lh, tile, quality, mpp, seed, kind), **common,
            )
            if index == 0:
                tres = 1e4 / (mpp * width / thumb.shape[1])
                tw.write(thumb, resolution=(tres, tres), rowsperstrip=16,
                         description=_description(width, height, thumb.shape[1], thumb.shape[0], tile,
                                                  quality, mpp, seed, "thumbnail"), **common)
            logger.debug("wrote level %d (%d x %d) of %s", index, lw, lh, path)

    mask = rend.tumour_mask(mask_mpp) if not blank else np.zeros(
        (math.ceil(height * mpp / mask_mpp), math.ceil(width * mpp / mask_mpp)), dtype=bool)
    mask_path = None
    if save_mask:
        mask_path = tumour_mask_path(path)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        meta = {"mask_mpp": mask_mpp, "slide": path.name, "width": width, "height": height,
                "mpp": mpp, "seed": seed, "shape": list(mask.shape)}
        mask_path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    seconds = time.perf_counter() - start
    logger.info("synthetic slide %s (%d x %d px, levels %s) in %.1f s", path, width, height, downsamples, seconds)
    return SyntheticSlide(path, width, height, float(mpp), mask, float(mask_mpp), mask_path,
                          downsamples, tile, seed, seconds)


def tumour_mask_path(slide_path: str | Path) -> Path:
    """Where the ground-truth mask PNG of a synthetic slide lives (its JSON sits beside it)."""
    slide_path = Path(slide_path)
    return slide_path.with_name(f"{slide_path.stem}_tumour_mask.png")


def load_tumour_mask(slide_path: str | Path) -> tuple[np.ndarray, float]:
    """Read the ground-truth mask saved beside a synthetic slide: ``(mask bool, mask_mpp)``."""
    slide_path = Path(slide_path)
    png = tumour_mask_path(slide_path)
    meta = json.loads(png.with_suffix(".json").read_text())
    return np.asarray(Image.open(png)) > 127, float(meta["mask_mpp"])


def load_synthetic_slide(slide_path: str | Path) -> SyntheticSlide | None:
    """The :class:`SyntheticSlide` record of a slide written earlier, or None when its saved
    ground truth (``<stem>_tumour_mask.png`` + ``.json``) is missing or unreadable — the caller
    then writes the slide again rather than trusting a half-written one."""
    slide_path = Path(slide_path)
    png = tumour_mask_path(slide_path)
    meta_path = png.with_suffix(".json")
    if not (slide_path.is_file() and png.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        mask, mask_mpp = np.asarray(Image.open(png)) > 127, float(meta["mask_mpp"])
        width, height, mpp = int(meta["width"]), int(meta["height"]), float(meta["mpp"])
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("cannot reuse synthetic slide %s (%s); it will be rewritten", slide_path, exc)
        return None
    if list(mask.shape) != list(meta.get("shape", mask.shape)):
        return None
    return SyntheticSlide(slide_path, width, height, mpp, mask, mask_mpp, png,
                          auto_downsamples(width, height), 0, int(meta.get("seed", 0)))
