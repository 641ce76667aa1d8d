"""Device-side JPEG decoding against the CPU block reads: speed, pixels, probabilities, faults.

    python benchmarks/gpu_decode.py --slide ../shared/data/slides/cmu_small_region.svs   # + a synthetic slide
    python benchmarks/gpu_decode.py --device cpu --synthetic-size 6000 4000              # CPU rehearsal

One JSON line per measurement (``"bench"`` names it), as the GPU check's other stages print:

* ``device_decode``: every tissue block of a grid (``--tile`` px at ``--tile-mpp`` µm/px) read
  by the CPU path (``read_block_task`` on ``--threads`` reader threads, the engine's reads) and by
  the device path (raw tiles read on the same threads, decoded by ``torchvision.io.decode_jpeg``
  on ``--device``: nvJPEG in one batch per block on CUDA, libjpeg-turbo on the reader threads on
  CPU, then resized and cut there). Best of ``--repeats`` after a cold pass: tiles/s and Mpx/s
  (tile pixels delivered) of both, their ratio, and the max/mean absolute pixel difference.
* ``device_decode_probs``: ``analyze_slide`` with the default model, ``decode="cpu"`` against
  ``decode="device"``: max/mean absolute probability difference and whether it is within 1e-4
  (the tolerance of the fast-path tests).
* ``device_decode_fault``: whether ``decode_jpeg`` on ``--device`` raises on a tile made
  undecodable as the fault fixtures make them (APP0 marker type byte set to 0x3f).

The synthetic slide is written once to ``--workdir``. ``device`` in every line says where the
device path ran ("cpu" on a machine without CUDA).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOLERANCE = 1e-4


def synthetic(workdir: Path, width: int, height: int) -> Path:
    """The cached synthetic slide (0.25 µm/px, 256 px JPEG tiles)."""
    from wsi_cmaf.slide import write_synthetic_slide

    path = workdir / f"device_decode_{width}x{height}.svs"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.svs")
        write_synthetic_slide(tmp, width, height, 0.25, tile=256, seed=11, save_mask=False)
        tmp.rename(path)
    return path


def _timed(run, repeats: int) -> tuple[float, list]:
    """Best seconds of ``repeats`` calls after a cold one, and the last result."""
    out = run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t0)
    return best, out


def decode_speed(path: Path, device, tile_mpp: float, tile: int, threads: int, repeats: int) -> dict:
    """CPU block reads vs device decoding of every tissue block (see the module docstring)."""
    import torch

    from wsi_cmaf.infer.dask_tasks import BlockFailure, SlideSpec, read_block_task
    from wsi_cmaf.infer.device_decode import JpegSource, RawBlock, decode_block, read_jpeg_block_task
    from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide
    from wsi_cmaf.slide.jpeg_tiles import jpeg_level

    with open_slide(path, backend="tiffslide") as r:
        grid = TileGrid.from_slide(r, GridConfig(mpp=tile_mpp, tile_size=tile, block_tiles=8), detect_tissue(r))
        level = jpeg_level(path, grid.level, r.level_dimensions[grid.level])
        overhead = float(r.call_overhead_px)
    spec = SlideSpec(str(path), "tiffslide", None)
    source = JpegSource(level, overhead, device.type == "cpu")
    with ThreadPoolExecutor(threads) as pool:
        def cpu_pass() -> list:
            return list(pool.map(lambda b: read_block_task(spec, grid, b), grid.blocks))

        def device_pass() -> list:
            items = []
            for item in pool.map(lambda b: read_jpeg_block_task(source, grid, b), grid.blocks):
                items.append(decode_block(item, grid, level, device) if isinstance(item, RawBlock) else item)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return items

        cpu_s, cpu = _timed(cpu_pass, repeats)
        dev_s, dev = _timed(device_pass, repeats)
    if any(isinstance(x, BlockFailure) for x in cpu + dev):
        raise RuntimeError("a block failed to read")
    n = sum(len(x.tiles) for x in cpu)
    px = sum(int(np.prod(x.tiles.shape[1:3])) * len(x.tiles) for x in cpu)
    diffs = [np.abs(np.asarray(d.tiles.cpu() if hasattr(d.tiles, "cpu") else d.tiles, np.int16)
                    - c.tiles.astype(np.int16)) for c, d in zip(cpu, dev) if len(c.tiles)]
    return {"grid_level": int(grid.level), "resized": not grid.exact, "tiles": n, "threads": threads,
            "cpu_tiles_per_s": round(n / cpu_s, 1), "device_tiles_per_s": round(n / dev_s, 1),
            "cpu_mpx_per_s": round(px / cpu_s / 1e6, 2), "device_mpx_per_s": round(px / dev_s / 1e6, 2),
            "device_over_cpu": round(cpu_s / dev_s, 2),
            "pixel_max_abs_diff": int(max(d.max() for d in diffs)) if diffs else None,
            "pixel_mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 4) if diffs else None}


def probabilities(path: Path, device, out: Path) -> dict:
    """Default model, decode cpu vs device: probability differences."""
    import zarr

    from wsi_cmaf.infer import InferenceConfig, analyze_slide

    probs = {}
    for decode in ("cpu", "device"):
        cfg = InferenceConfig(device=device.type, decode=decode, compile="off", progress=False, overlay=False,
                              geojson=False, qc=False)
        res = analyze_slide(path, out=out / decode, config=cfg, overwrite=True)
        probs[decode] = np.asarray(zarr.open_group(str(res.store), mode="r")["0"])
    a, b = probs["cpu"], probs["device"]
    both = np.isfinite(a) & np.isfinite(b)
    d = np.abs(a[both] - b[both])
    worst = float(d.max()) if d.size else 0.0
    return {"values": int(both.sum()), "same_nan": bool((np.isnan(a) == np.isnan(b)).all()),
            "max_abs_diff": worst, "mean_abs_diff": float(d.mean()) if d.size else 0.0,
            "tolerance": TOLERANCE, "within": bool(worst <= TOLERANCE)}


def fault(path: Path, device, tmp: Path) -> dict:
    """Does decode_jpeg on ``device`` raise on a stream whose APP0 marker type is 0x3f?"""
    import tifffile
    import torch
    from torchvision.io import decode_jpeg

    from wsi_cmaf.slide.jpeg_tiles import JpegTileReader, jpeg_level

    bad = tmp / "bad.svs"
    shutil.copy(path, bad)
    with tifffile.TiffFile(bad) as tf:
        page = tf.series[0].levels[0].keyframe
        tile = int(np.argmax(page.databytecounts))
        offset = page.dataoffsets[tile]
    with open(bad, "r+b") as fh:
        fh.seek(offset + 3)
        fh.write(b"\x3f")
    reader = JpegTileReader(bad)
    (stream,) = reader.read(jpeg_level(bad, 0), [tile])
    reader.close()
    try:
        decode_jpeg([torch.frombuffer(bytearray(stream), dtype=torch.uint8)], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except RuntimeError as exc:
        return {"raised": True, "error": str(exc)[-200:]}
    return {"raised": False, "error": None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, action="append", default=[], help="real JPEG TIFF/SVS slide (repeatable)")
    p.add_argument("--synthetic-size", type=int, nargs=2, default=[16000, 12000], metavar=("W", "H"))
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi_cmaf_gpu_decode")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    p.add_argument("--tile-mpp", type=float, default=1.0)
    p.add_argument("--tile", type=int, default=224)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-probs", action="store_true", help="skip the analyze_slide comparison")
    args = p.parse_args(argv)

    from wsi_cmaf.device import resolve_device

    device = resolve_device(args.device)
    slides = [*args.slide, synthetic(args.workdir, *args.synthetic_size)]
    for path in slides:
        base = {"slide": path.name, "device": device.type}
        try:
            rec = decode_speed(path, device, args.tile_mpp, args.tile, args.threads, args.repeats)
        except Exception as exc:  # one slide's failure is reported, the others still run
            rec = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"bench": "device_decode", **base, **rec}), flush=True)
        if not args.no_probs:
            with tempfile.TemporaryDirectory() as tmp:
                print(json.dumps({"bench": "device_decode_probs", **base, **probabilities(path, device, Path(tmp))}),
                      flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps({"bench": "device_decode_fault", "slide": slides[-1].name, "device": device.type,
                          **fault(slides[-1], device, Path(tmp))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
