"""How fast can slide pixels be decoded? The decode bound of block reads, and GPU JPEG decoding.

    python benchmarks/bench_decode.py --threads 1 2 8 16                      # 40,000² synthetic slide
    python benchmarks/bench_decode.py --size 100000 80000 --cache-dir /tmp/wsi-bench
    python benchmarks/bench_decode.py --slide ../shared/data/slides/cmu_small_region.svs --nvjpeg

Three measurements, one JSON line each:

* ``decode_bound``: the project's own block reads (``read_block_task``, as ``analyze_slide`` runs
  them: per-thread readers, the block backend ``analyze_slide`` picks) over every tissue block of
  a 50 px @ 4 µm/px grid, at each ``--threads`` count, with as many blocks in flight as threads.
  Best of ``--repeats`` passes after a first, cold one (reported too: it opens the readers).
  Nothing else happens to the tiles, so this is the most tiles/s the streaming loop can reach on
  this machine with that many reader threads.
* ``jpeg_decode`` (``--nvjpeg``): the raw JPEG tiles of the pyramid level the grid reads (bytes
  straight from tifffile, JPEG tables merged in), decoded (a) on the CPU by tifffile's own codec
  (imagecodecs/libjpeg-turbo) on ``max(--threads)`` threads and (b) on the GPU by
  ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG) in batches; throughput in Mpx/s and the
  pixel difference between the two (max and mean absolute, per channel value).
* ``cucim``: whether cuCIM imports; when it does, its ``read_region`` over the same windows the
  block reads use, at each thread count.

Slides: ``--slide`` for a real file (repeatable), else a synthetic Aperio-style slide written once
to ``--cache-dir`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wsi-cmaf" / "bench"


def synthetic_slide(width: int, height: int, folder: Path, workers: int) -> Path:
    """The cached synthetic slide of that size (written on first use; only complete files are reused)."""
    from wsi_cmaf.slide import write_synthetic_slide

    path = folder / f"bench_{width}x{height}_seed0.tiff"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.tiff")
        write_synthetic_slide(tmp, width, height, 0.25, seed=0, save_mask=False, workers=workers)
        tmp.rename(path)
    return path


def _grid(path: Path, mpp: float | None, tile_mpp: float, tile: int, block_tiles: int):
    from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide
    from wsi_cmaf.slide.reads import block_read_backend

    with open_slide(path, mpp=mpp) as reader:
        grid = TileGrid.from_slide(reader, GridConfig(mpp=tile_mpp, tile_size=tile, block_tiles=block_tiles),
                                   detect_tissue(reader))
        return grid, block_read_backend(reader), tuple(reader.mpp) if mpp else None


def decode_bound(path: Path, grid, backend: str, mpp, threads: int, repeats: int) -> dict:
    """Tissue tiles/s of the engine's block reads with ``threads`` reader threads.

    One pool for every pass, as a dask worker keeps its threads: the first (cold) pass includes
    each thread opening its reader; the best of the ``repeats`` passes after it is the steady
    decode rate. On the H200 machine a fresh pool per pass made 8 threads look slower than 2 on
    an 8-block slide, because opening readers cost more than decoding (2026-11-30).
    """
    from wsi_cmaf.infer.dask_tasks import BlockFailure, SlideSpec, read_block_task

    spec = SlideSpec(str(path), backend, mpp)
    times, n_tiles = [], 0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            results = list(pool.map(lambda b: read_block_task(spec, grid, b), grid.blocks))
            times.append(time.perf_counter() - t0)
            failures = [r for r in results if isinstance(r, BlockFailure)]
            if failures:
                raise RuntimeError(f"{len(failures)} block(s) failed: {failures[0].error}")
            n_tiles = sum(len(r.tiles) for r in results)
    best = min(times[1:])
    return {"threads": threads, "tiles": n_tiles, "seconds": round(best, 4),
            "tiles_per_s": round(n_tiles / best, 1), "cold_tiles_per_s": round(n_tiles / times[0], 1)}


#: APP14 "Adobe" segment with transform 0: the components are RGB, not YCbCr. Aperio writes JPEG
#: tiles in RGB (TIFF photometric 2) without saying so inside the stream, so a stand-alone decoder
#: (libjpeg, nvJPEG) would apply the YCbCr->RGB transform and ruin the colours; tifffile avoids this
#: by passing the colour space to its codec, and this marker does the same for any decoder.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def _raw_jpeg_tiles(path: Path, level: int, limit: int) -> tuple[list[bytes], object]:
    """Complete JPEG streams of up to ``limit`` tiles of ``level`` (tables spliced in) and the page."""
    import tifffile

    tif = tifffile.TiffFile(str(path))
    page = tif.series[0].levels[level].pages[0]
    if page.compression != 7:
        raise ValueError(f"level {level} is not JPEG (TIFF compression {page.compression})")
    fh = tif.filehandle
    streams = []
    for off, n in list(zip(page.dataoffsets, page.databytecounts))[:limit]:
        if n == 0:
            continue
        fh.seek(off)
        data = fh.read(n)
        if page.jpegtables is not None:
            # Abbreviated TIFF JPEG: tables stream (SOI..EOI) + tile stream (SOI..EOI) -> one stream.
            data = page.jpegtables[:-2] + data[2:]
        if page.photometric == 2:
            data = data[:2] + ADOBE_RGB + data[2:]
        streams.append(data)
    return streams, page


def jpeg_decode(path: Path, level: int, threads: int, limit: int, repeats: int, batch: int) -> dict:
    """CPU (tifffile codec) vs GPU (nvJPEG) decoding of the same raw tiles, speed and pixels."""
    import torch

    streams, page = _raw_jpeg_tiles(path, level, limit)
    px = sum(page.tilewidth * page.tilelength for _ in streams)
    rec: dict = {"tiles": len(streams), "tile_px": [page.tilelength, page.tilewidth],
                 "photometric": int(page.photometric), "cpu_threads": threads}

    def cpu_one(i: int) -> np.ndarray:
        # page.decode is tifffile's own path (it handles Aperio's RGB-coded JPEG); the stream
        # already holds the tables, so none are passed again.
        return page.decode(streams[i], i)[0][0]

    with ThreadPoolExecutor(threads) as pool:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            cpu = list(pool.map(cpu_one, range(len(streams))))
            best = min(best, time.perf_counter() - t0)
    rec["cpu_mpx_per_s"] = round(px / best / 1e6, 1)
    if not torch.cuda.is_available():
        rec["gpu"] = "skipped: no CUDA device"
        return rec
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    dev = torch.device("cuda")
    gpu: list = []
    decode_jpeg(data[:batch], device=dev, mode=ImageReadMode.RGB)  # warm-up: nvJPEG handle, buffers
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        gpu = []
        t0 = time.perf_counter()
        for i in range(0, len(data), batch):
            gpu.extend(decode_jpeg(data[i:i + batch], device=dev, mode=ImageReadMode.RGB))
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    rec["gpu_mpx_per_s"] = round(px / best / 1e6, 1)
    rec["gpu_over_cpu"] = round(rec["gpu_mpx_per_s"] / rec["cpu_mpx_per_s"], 2)
    diffs = [np.abs(g.permute(1, 2, 0).cpu().numpy().astype(np.int16) - c.astype(np.int16)) for g, c in zip(gpu, cpu)]
    rec["max_abs_diff"] = int(max(d.max() for d in diffs))
    rec["mean_abs_diff"] = round(float(np.mean([d.mean() for d in diffs])), 4)
    return rec


def cucim_reads(path: Path, grid, backend: str, threads: int, repeats: int) -> dict:
    """cuCIM ``read_region`` of each tissue block's bounding window at the grid's level, against the
    project's own reader (``backend``) on the same windows: time of both, and the pixel difference.

    cuCIM parallelises one read internally over ``num_workers`` threads; the project's reader is
    timed on one thread, reading the windows one after another as one block thread does.
    """
    try:
        from cucim import CuImage
    except ImportError as exc:
        return {"available": False, "reason": f"cucim not importable: {exc}"}
    from wsi_cmaf.slide import open_slide
    from wsi_cmaf.slide.grid import level0_for_level_px

    img = CuImage(str(path))
    t, step, ds = grid.config.tile_size, grid.config.step, grid.level_downsample
    windows = []
    for b in grid.blocks:
        rows, cols = grid.tissue_indices(b)
        if rows.size:
            y0, x0 = int(rows.min()) * step, int(cols.min()) * step
            h, w = (int(rows.max()) - int(rows.min())) * step + t, (int(cols.max()) - int(cols.min())) * step + t
            windows.append(((level0_for_level_px(x0, ds), level0_for_level_px(y0, ds)), (w, h)))

    def timed(read) -> tuple[float, list[np.ndarray]]:
        best, out = float("inf"), []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = [read(loc, size) for loc, size in windows]
            best = min(best, time.perf_counter() - t0)
        return best, out

    cu_s, cu = timed(lambda loc, size: np.asarray(img.read_region(loc, size, grid.level, num_workers=threads))[..., :3])
    with open_slide(path, backend=backend) as reader:
        own_s, own = timed(lambda loc, size: reader.read_region(loc, grid.level, size))
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(cu, own)]
    px = sum(int(np.prod(size)) for _, size in windows)
    return {"available": True, "threads": threads, "windows": len(windows), "mpx": round(px / 1e6, 2),
            "cucim_s": round(cu_s, 4), "own_backend": backend, "own_s_1_thread": round(own_s, 4),
            "cucim_over_own": round(own_s / cu_s, 2),
            "max_abs_diff": int(max(d.max() for d in diffs)) if diffs else None,
            "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 4) if diffs else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, action="append", default=[], help="real slide (repeatable)")
    p.add_argument("--mpp", type=float, default=None, help="µm/px override for --slide files without one")
    p.add_argument("--size", type=int, nargs=2, default=[40000, 40000], metavar=("W", "H"))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="processes for writing the synthetic slide")
    p.add_argument("--tile-mpp", type=float, default=4.0)
    p.add_argument("--tile", type=int, default=50)
    p.add_argument("--block-tiles", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nvjpeg", action="store_true", help="also compare CPU and nvJPEG decoding of raw tiles")
    p.add_argument("--jpeg-limit", type=int, default=2000, help="at most this many raw tiles for --nvjpeg")
    p.add_argument("--jpeg-batch", type=int, default=256)
    p.add_argument("--cucim", action="store_true", help="also time cuCIM reads when it imports")
    args = p.parse_args(argv)

    slides = list(args.slide) or [synthetic_slide(*args.size, args.cache_dir or _cache_dir(), args.workers)]
    for path in slides:
        grid, backend, mpp = _grid(path, args.mpp if args.slide else None, args.tile_mpp, args.tile, args.block_tiles)
        base = {"slide": path.name, "level": int(grid.level), "tissue_tiles": int(grid.tissue.sum()),
                "blocks": len(grid.blocks), "block_backend": backend, "cpus": os.cpu_count()}
        for n in args.threads:
            print(json.dumps({"bench": "decode_bound", **base, **decode_bound(path, grid, backend, mpp, n,
                                                                              args.repeats)}), flush=True)
        if args.nvjpeg:
            try:
                rec = jpeg_decode(path, grid.level, max(args.threads), args.jpeg_limit, args.repeats, args.jpeg_batch)
            except ValueError as exc:
                rec = {"skipped": str(exc)}
            print(json.dumps({"bench": "jpeg_decode", **base, **rec}), flush=True)
        if args.cucim:
            for n in args.threads:
                rec = cucim_reads(path, grid, backend, n, args.repeats)
                print(json.dumps({"bench": "cucim", **base, **rec}), flush=True)
                if not rec["available"]:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
