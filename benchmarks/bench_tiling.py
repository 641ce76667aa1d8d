"""Tissue tiles/s: engine block reads vs a naive one-read_region-per-tile loop (issue 2, §8).

    .venv/bin/python benchmarks/bench_tiling.py                     # 40,000 x 40,000 px slide
    .venv/bin/python benchmarks/bench_tiling.py --size 60000 --backends tiffslide

A synthetic Aperio-style slide (0.25 µm/px, levels 1/4/16/64) is written once to a cache
folder (default ``$XDG_CACHE_HOME/wsi-cmaf/bench`` or ``~/.cache/wsi-cmaf/bench``), never into
the repository. For each backend, on the tissue tiles of a 50 px x 4 µm/px grid (level with
downsample 16, no resizing):

* naive: the backend library's own ``read_region`` once per tissue tile at that level, converted
  to a numpy array (OpenSlide: RGBA PIL image; tiffslide: ``as_array=True``);
* engine: :func:`wsi_cmaf.slide.read_block` over the blocks with tissue, with the backend
  ``analyze_slide`` reads blocks with for a slide that backend opened
  (:func:`wsi_cmaf.slide.reads.block_read_backend`: tiffslide for TIFF-family files OpenSlide
  opened); ``block_same_backend_tiles_per_s`` is the engine forced onto the naive loop's backend.

Each figure is the best of ``--repeats`` passes, each on a freshly opened slide (so OpenSlide's
tile cache starts cold every pass). One JSON line per backend; exit code 1 when a floor fails
(engine >= 5x tiffslide's per-tile loop, >= 1.2x OpenSlide's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

FLOORS = {"tiffslide": 5.0, "openslide": 1.2}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wsi-cmaf" / "bench"


def _naive(backend: str, path: Path, level: int, locations: list[tuple[int, int]], size: int) -> float:
    """Seconds for one per-tile pass with the library's own API."""
    if backend == "openslide":
        import openslide

        slide = openslide.OpenSlide(str(path))
        start = time.perf_counter()
        for loc in locations:
            tile = np.asarray(slide.read_region(loc, level, (size, size)))
        elapsed = time.perf_counter() - start
    else:
        import tiffslide

        slide = tiffslide.TiffSlide(str(path))
        start = time.perf_counter()
        for loc in locations:
            tile = slide.read_region(loc, level, (size, size), as_array=True)
        elapsed = time.perf_counter() - start
    assert tile.shape[:2] == (size, size)
    slide.close()
    return elapsed


def _engine(backend: str, path: Path, grid) -> tuple[float, int]:
    """Seconds and tiles for one pass of block reads through the engine."""
    from wsi_cmaf.slide import open_slide, read_block

    with open_slide(path, backend=backend) as reader:
        start = time.perf_counter()
        n = 0
        for block in grid.blocks:
            n += len(read_block(reader, grid, block).tiles)
        return time.perf_counter() - start, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=40_000, help="slide width = height in px (>= 40000 for §8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--backends", nargs="+", default=["openslide", "tiffslide"], choices=sorted(FLOORS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block-tiles", type=int, default=32)
    args = p.parse_args(argv)

    from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide, write_synthetic_slide
    from wsi_cmaf.slide.reads import block_read_backend

    folder = args.cache_dir or _cache_dir()
    path = folder / f"bench_{args.size}x{args.size}_seed{args.seed}.tiff"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.tiff")
        write_synthetic_slide(tmp, args.size, args.size, 0.25, seed=args.seed, save_mask=False, workers=2)
        tmp.rename(path)  # only a complete file is ever reused
    config = GridConfig(mpp=4.0, tile_size=50, block_tiles=args.block_tiles)
    failed = False
    for backend in args.backends:
        with open_slide(path, backend=backend) as reader:
            grid = TileGrid.from_slide(reader, config, detect_tissue(reader))
            # What analyze_slide does for a slide this backend opened (InferenceConfig.block_backend="auto").
            block_backend = block_read_backend(reader)
        rows, cols = np.nonzero(grid.tissue)
        locations = [grid.tile_location(int(r), int(c)) for r, c in zip(rows, cols)]
        naive = min(_naive(backend, path, grid.level, locations, config.tile_size) for _ in range(args.repeats))
        engine, n_engine = min(_engine(block_backend, path, grid) for _ in range(args.repeats))
        same = engine if block_backend == backend else min(_engine(backend, path, grid)
                                                           for _ in range(args.repeats))[0]
        assert n_engine == len(locations), (n_engine, len(locations))
        naive_rate, engine_rate = len(locations) / naive, n_engine / engine
        ratio = engine_rate / naive_rate
        record = {
            "bench": "tiling", "backend": backend, "slide_px": [args.size, args.size], "slide_mpp": 0.25,
            "tile_mpp": config.mpp, "tile_size": config.tile_size, "level": grid.level,
            "level_downsample": grid.level_downsample, "resize": not grid.exact,
            "block_tiles": config.block_tiles, "blocks": len(grid.blocks), "tissue_tiles": n_engine,
            "naive_tiles_per_s": round(naive_rate), "block_backend": block_backend,
            "block_tiles_per_s": round(engine_rate),
            "block_same_backend_tiles_per_s": round(n_engine / same),
            "ratio": round(ratio, 2), "floor": FLOORS[backend], "pass": ratio >= FLOORS[backend],
        }
        failed |= not record["pass"]
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
