"""Batch throughput on a dask LocalCluster: slides/hour with 1 and 2 worker processes, and overheads.

    python benchmarks/bench_batch.py --slides 8

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=[16000, 12000])
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi_cmaf_bench_batch")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(args.slides):
        p = args.workdir / f"slide_{i}.tiff"
        if not p.exists():
            write_synthetic_slide(p, args.size[0], args.size[1], args.mpp, seed=100 + i, tumour=True)
        slides.append(p)
    model = resolve_model(create_model("timm:resnet18", num_classes=2, input_size=64),
                          ModelConfig(architecture="timm:resnet18", input_size=64, stain_normalization="macenko",
                                      weights_note="untrained (benchmark)"))
    cfg = InferenceConfig(progress=False, reader_threads=1, batch_size=256)
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cl, Client(cl) as c:
            c.run(lambda: __import__("torch").set_num_threads(max(1, (os.cpu_count() or 2) // workers)))
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
