"""Batch throughput on a real single-node SLURM: slides/hour with 1 and 2 jobs, and what one
cancelled job costs.

    .ci/slurm-up && .venv/bin/python benchmarks/bench_slurm.py --slides 8

Prints one JSON line per run (``jobs``, ``wall_s``, ``slides_per_hour``, ``first_worker_s``: from
the start of the batch to its first worker joining, i.e. one job start) and a ``cancel_cost``
line: the extra wall time of a 2-job batch in which one job is ``scancel``led once both run,
against the lost slide's own analysis time plus one job start (what the issue expects it to be).
Same model and slides as ``bench_batch.py`` (ResNet-18 @64, 16,000 × 12,000 synthetic slides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_cmaf.cluster import analyze_slides  # noqa: E402
from wsi_cmaf.infer import InferenceConfig  # noqa: E402
from wsi_cmaf.infer.modelspec import resolve_model  # noqa: E402
from wsi_cmaf.models import ModelConfig, create_model  # noqa: E402
from wsi_cmaf.slide.synthetic import write_synthetic_slide  # noqa: E402


def _running(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i"], capture_output=True,
                         text=True, timeout=20).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _run(slides, out: Path, model, jobs: int, cancel_after: float | None) -> dict:
    name = f"bench-{uuid.uuid4().hex[:6]}"
    opts = {"cores": 1, "memory": "6GiB", "walltime": "00:30:00", "job_name": name,
            "job_script_prologue": ["export OMP_NUM_THREADS=1"]}
    events: dict[str, float] = {}
    t0 = time.perf_counter()

    def watch() -> None:
        while time.perf_counter() - t0 < 1800 and "end" not in events:
            running = _running(name)
            if running and "first_job" not in events:
                events["first_job"] = time.perf_counter() - t0
            if list(out.glob("*/*.zarr")) and "first_store" not in events:
                events["first_store"] = time.perf_counter() - t0
            if (cancel_after is not None and "cancelled" not in events and len(running) == jobs
                    and "first_store" in events and time.perf_counter() - t0 > events["first_store"] + cancel_after):
                subprocess.run(["scancel", running[0]], check=True, timeout=30)
                events["cancelled"] = time.perf_counter() - t0
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    cfg = InferenceConfig(progress=False, reader_threads=1, overlay=False, geojson=False)
    res = analyze_slides(slides, out, model=model, cluster="slurm", workers=jobs, config=cfg, progress=False,
                         cluster_kwargs=opts)
    wall = time.perf_counter() - t0
    events["end"] = wall
    t.join()
    assert res.counts == {"done": len(slides)}, res.rows
    secs = [float(r["seconds"]) for r in res.rows]
    return {"jobs": jobs, "slides": len(slides), "wall_s": round(wall, 1),
            "slides_per_hour": round(len(slides) / wall * 3600),
            "first_worker_s": round(events.get("first_store", 0), 1),
            "slide_s_mean": round(sum(secs) / len(secs), 2), "cancelled_at_s": events.get("cancelled"),
            "load_avg_1min": round(os.getloadavg()[0], 1)}


def main() -> None:
    """Run the three batches and print their JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=(16000, 12000))
    ap.add_argument("--cancel-after", type=float, default=3.0, help="seconds after the first store appears")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsi_bench_slurm_", dir=os.path.expanduser("~")))
    slides = [write_synthetic_slide(work / "in" / f"s{i}.tiff", *args.size, 0.5, seed=i).path
              if not (work / "in" / f"s{i}.tiff").exists() else work / "in" / f"s{i}.tiff"
              for i in range(args.slides)]
    model = resolve_model(create_model("timm:resnet18", num_classes=2, input_size=64),
                          ModelConfig(architecture="timm:resnet18", input_size=64, stain_normalization="macenko",
                                      weights_note="untrained (benchmark)"))
    results = {}
    for label, jobs, cancel in (("1job", 1, None), ("2jobs", 2, None), ("2jobs_cancel", 2, args.cancel_after)):
        r = _run(slides, work / f"out_{label}_{uuid.uuid4().hex[:4]}", model, jobs, cancel)
        results[label] = r
        print(json.dumps({"run": label, **r}), flush=True)
    base, hit = results["2jobs"], results["2jobs_cancel"]
    expected = base["slide_s_mean"] + base["first_worker_s"]
    print(json.dumps({"cancel_cost": {"extra_wall_s": round(hit["wall_s"] - base["wall_s"], 1),
                                      "lost_slide_s_plus_job_start_s": round(expected, 1)}}), flush=True)


if __name__ == "__main__":
    main()
