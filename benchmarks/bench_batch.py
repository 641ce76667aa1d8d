"""Batch throughput on a dask LocalCluster: slides/hour with 1 and 2 worker processes, and overheads.

    python benchmarks/bench_batch.py --slides 8
    # one GPU, several slides in flight (issue 12): slides/hour vs the model alone and vs decoding alone
    python benchmarks/bench_batch.py --gpu --slides 20 --size 40000 40000 --slides-per-gpu 2 \
        --precision bf16 --compile off --reader-threads 4 --workdir /tmp/wsi_bench_batch

``--gpu`` prints one ``batch_gpu`` line: slides/hour of ``analyze_slides`` on a one-worker-per-GPU
cluster (``cluster="local-cuda"``), what the model alone would allow (all tissue tiles at
model-only tiles/s) and what decoding alone would allow (the project's block reads of every
tissue block on ``slides_per_gpu * reader_threads`` threads), and which bound applies (the lower one).

Prints one JSON line per measurement:
- ``batch``: slides/hour for N synthetic slides with 1 and 2 worker processes (same model, CPU);
- ``scheduler_task_overhead``: round-trip cost of a no-op task on the same cluster;
- ``per_slide_overhead``: batch wall time minus the slides' own analysis time, per slide;
- ``block_transfer``: cost of moving one block of tiles between worker processes, the price a
  per-block task split would pay on top of reading it where it is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster, wait

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_cmaf.cluster import analyze_slides  # noqa: E402
from wsi_cmaf.infer import InferenceConfig  # noqa: E402
from wsi_cmaf.infer.modelspec import resolve_model  # noqa: E402
from wsi_cmaf.models import ModelConfig, create_model  # noqa: E402
from wsi_cmaf.slide.synthetic import write_synthetic_slide  # noqa: E402


def _noop(x: int) -> int:
    return x


def _decode_tiles(path: Path, mpp_tile: float, tile: int) -> tuple[list, int]:
    """(read callables of every tissue block, tissue tiles) of a slide, as the loop reads them."""
    from wsi_cmaf.slide.grid import GridConfig, TileGrid
    from wsi_cmaf.slide.reader import open_slide
    from wsi_cmaf.slide.reads import block_read_backend, read_block
    from wsi_cmaf.slide.tissue import TissueConfig, detect_tissue

    with open_slide(path) as r:
        grid = TileGrid.from_slide(r, GridConfig(mpp=mpp_tile, tile_size=tile), detect_tissue(r, TissueConfig()))
        backend = block_read_backend(r)
    import threading

    local = threading.local()

    def read(block):
        if not hasattr(local, "r"):
            local.r = open_slide(path, backend=backend)
        return len(read_block(local.r, grid, block).tiles)

    return [(read, b) for b in grid.blocks], grid.n_tissue


def decode_bound_tiles_per_s(slides: list[Path], threads: int, mpp_tile: float = 4.0, tile: int = 50) -> float:
    """Tissue tiles/s of the project's block reads alone, on ``threads`` dask threads."""
    import dask

    reads, total = [], 0
    for p in slides:
        r, n = _decode_tiles(p, mpp_tile, tile)
        reads += r
        total += n
    t0 = time.perf_counter()
    dask.compute(*[dask.delayed(f)(b) for f, b in reads], scheduler="threads", num_workers=threads)
    return total / (time.perf_counter() - t0)


def bench_gpu(slides: list[Path], model, args) -> None:
    """Slides/hour on one GPU with several slides in flight, vs model-only and decode bounds."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_pipeline import model_only_tiles_per_s  # noqa: E402

    device = torch.device(args.device)
    cfg = InferenceConfig(progress=False, reader_threads=args.reader_threads, batch_size=args.batch_size,
                          precision=args.precision, compile=args.compile, device=args.device,
                          overlay=not args.no_exports, geojson=not args.no_exports)
    model_tps = model_only_tiles_per_s(model, args.batch_size, device, 3.0, args.precision, args.compile)
    with tempfile.TemporaryDirectory() as out:
        # warm-up slide (CUDA context, kernels, compile) in the same cluster kind, not timed
        analyze_slides(slides[:1], Path(out) / "warm", model=model, cluster="local-cuda", workers=1,
                       slides_per_gpu=args.slides_per_gpu, config=cfg, progress=False)
        t0 = time.perf_counter()
        res = analyze_slides(slides, Path(out) / "run", model=model, cluster="local-cuda", workers=1,
                             slides_per_gpu=args.slides_per_gpu, config=cfg, progress=False)
        wall = time.perf_counter() - t0
    tiles = int(sum(int(r["tissue_tiles"] or 0) for r in res.rows))
    decode_tps = decode_bound_tiles_per_s(slides, args.slides_per_gpu * args.reader_threads)
    sph = 3600 * len(slides) / wall
    model_sph = 3600 * len(slides) / (tiles / model_tps)
    decode_sph = 3600 * len(slides) / (tiles / decode_tps)
    bound = "decode" if decode_sph < model_sph else "model"
    ref = min(model_sph, decode_sph)
    print(json.dumps({
        "bench": "batch_gpu", "slides": len(slides), "size": args.size, "tissue_tiles": tiles,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "slides_per_gpu": args.slides_per_gpu, "reader_threads": args.reader_threads,
        "batch_size": args.batch_size, "precision": args.precision, "compile": args.compile,
        "wall_s": round(wall, 2), "slides_per_hour": round(sph, 1),
        "model_only_tiles_per_s": round(model_tps, 1), "model_bound_slides_per_hour": round(model_sph, 1),
        "decode_tiles_per_s": round(decode_tps, 1), "decode_threads": args.slides_per_gpu * args.reader_threads,
        "decode_bound_slides_per_hour": round(decode_sph, 1), "bound_applies": bound,
        "ratio_to_bound": round(sph / ref, 3), "floor": {"min": 0.7, "ok": sph / ref >= 0.7},
        "statuses": res.counts,
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=[16000, 12000])
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi_cmaf_bench_batch")
    ap.add_argument("--gpu", action="store_true", help="one-GPU batch (local-cuda cluster) instead of CPU workers")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--slides-per-gpu", type=int, default=2)
    ap.add_argument("--reader-threads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--compile", default="off")
    ap.add_argument("--no-exports", action="store_true", help="no overlay/GeoJSON per slide")
    ap.add_argument("--write-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prepare-only", action="store_true", help="write the synthetic slides and stop")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(args.slides):
        p = args.workdir / f"slide_{args.size[0]}x{args.size[1]}_{i}.tiff"
        if not p.exists():
            partial = p.with_name(p.stem + ".partial.tiff")  # an interrupted write is no cache
            write_synthetic_slide(partial, args.size[0], args.size[1], args.mpp, seed=100 + i, tumour=True,
                                  workers=args.write_workers)
            os.replace(partial, p)
        slides.append(p)
    if args.prepare_only:
        return
    model = resolve_model(create_model("timm:resnet18", num_classes=2, input_size=64),
                          ModelConfig(architecture="timm:resnet18", input_size=64, stain_normalization="macenko",
                                      weights_note="untrained (benchmark)"))
    if args.gpu:
        bench_gpu(slides, model, args)
        return
    cfg = InferenceConfig(progress=False, reader_threads=1, batch_size=256)
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cl, Client(cl) as c:
            threads = max(1, (os.cpu_count() or 2) // workers)
            c.run(lambda n=threads: __import__("torch").set_num_threads(n))
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                res = analyze_slides(slides, out, model=model, client=c, config=cfg, progress=False)
                wall = time.perf_counter() - t0
            slide_s = sum(float(r["seconds"]) for r in res.rows)
            print(json.dumps({
                "bench": "batch", "workers": workers, "slides": len(slides), "wall_s": round(wall, 2),
                "slides_per_hour": round(3600 * len(slides) / wall, 1),
                "tissue_tiles": int(sum(int(r["tissue_tiles"]) for r in res.rows)),
                "statuses": res.counts, "cpu_count": os.cpu_count(),
            }), flush=True)
            print(json.dumps({
                "bench": "per_slide_overhead", "workers": workers,
                "s_per_slide": round((wall * workers - slide_s) / len(slides), 3),
                "note": "worker-seconds not spent inside the slide tasks, per slide (scheduling, model "
                        "scatter, status table, startup of the per-slide reader client)",
            }), flush=True)
            if workers == 2:
                n = 2000
                t0 = time.perf_counter()
                wait(c.map(_noop, range(n), pure=False))
                per_task = (time.perf_counter() - t0) / n
                print(json.dumps({"bench": "scheduler_task_overhead", "workers": workers,
                                  "ms_per_task": round(1000 * per_task, 3), "tasks": n}), flush=True)
                block = np.random.default_rng(0).integers(0, 255, (1024, 50, 50, 3), dtype=np.uint8)
                w0, w1 = list(c.scheduler_info()["workers"])[:2]
                fut = c.scatter(block, workers=[w0], direct=True)
                t0 = time.perf_counter()
                reps = 20
                for _ in range(reps):
                    moved = c.submit(np.copy, fut, workers=[w1], pure=False)
                    wait(moved)
                    moved.release()
                print(json.dumps({"bench": "block_transfer", "block_tiles": 1024, "mb": round(block.nbytes / 1e6, 2),
                                  "ms_per_block": round(1000 * (time.perf_counter() - t0) / reps, 2)}), flush=True)


if __name__ == "__main__":
    main()
