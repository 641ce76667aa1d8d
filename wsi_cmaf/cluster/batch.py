"""``analyze_slides``: many slides on a dask.distributed cluster, one task per slide.

Why one task per slide and not per block: a slide task reuses the single-slide code path
(so a batch heatmap is bit-identical to ``analyze_slide``), keeps all of a slide's tile data on
the worker that reads it (no tile transfer between workers), and gives archives of many slides
full parallelism; see the closing measurements in benchmarks/README.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from distributed import Client, as_completed
from tqdm.auto import tqdm

from wsi_cmaf.cluster.engine import connect
from wsi_cmaf.cluster.inputs import SlideJob
from wsi_cmaf.cluster.plan import BatchPlan, BatchResult, plan_batch
from wsi_cmaf.errors import WsiCmafError
from wsi_cmaf.infer.config import InferenceConfig
from wsi_cmaf.infer.modelspec import ResolvedModel, quick_weights_sha256, resolve_model
from wsi_cmaf.slide.reader import file_fingerprint

logger = logging.getLogger(__name__)

__all__ = ["BatchResult", "analyze_slides", "slide_task"]


def slide_task(job: SlideJob, out_dir: str, model: ResolvedModel, cfg: InferenceConfig) -> dict[str, Any]:
    """Analyse one slide on a worker. Bad slides return a 'failed' row; transient errors raise (retried)."""
    from wsi_cmaf.infer import analyze_slide

    t0 = time.perf_counter()
    row: dict[str, Any] = {"slide": str(job.path), "key": job.key, "model_hash": model.weights_sha256}
    try:
        row["fingerprint"] = file_fingerprint(job.path)
        result = analyze_slide(job.path, model=model, out=Path(out_dir) / job.key, mpp=job.mpp,
                               resume=True, config=cfg)
    except WsiCmafError as exc:  # a property of the slide: retrying cannot help
        row.update(status="failed", error=str(exc), seconds=round(time.perf_counter() - t0, 3))
        return row
    row.update(status="done" if not result.blocks_failed else "partial", error="; ".join(result.warnings),
               tissue_tiles=result.tiles_tissue, seconds=round(time.perf_counter() - t0, 3),
               output=str(result.store))
    return row


def analyze_slides(
    slides: str | Path | list[str | Path],
    out_dir: str | Path,
    *,
    model: Any = None,
    model_config: Any = None,
    client: Client | None = None,
    scheduler: str | None = None,
    cluster: str = "local",
    workers: int | None = None,
    gpus_per_worker: int = 0,
    slides_per_gpu: int = 2,
    cluster_kwargs: dict[str, Any] | None = None,
    config: InferenceConfig | None = None,
    retries: int = 2,
    progress: bool = True,
    plan: BatchPlan | None = None,
) -> BatchResult:
    """Analyse every slide in ``slides`` into ``out_dir/<key>/``, tracking them in ``out_dir/status.csv``.

    Completed slides (same file fingerprint, same model) are skipped; partial ones resume chunk by
    chunk. A slide that cannot be read fails alone with its error recorded. When the status table
    says every slide is done, no model is loaded and no cluster is started.

    GPU workers (``gpus_per_worker`` > 0, or ``cluster="local-cuda"``) run ``slides_per_gpu``
    slides at once per GPU; a local cluster then gets one worker process per visible GPU.
    ``plan``: :func:`~wsi_cmaf.cluster.plan.plan_batch` of these slides and ``out_dir`` made by the
    caller (the CLI's rerun check); reused when planned for the same weights, so the slides are not
    fingerprinted twice.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    # The status table alone decides what is left: hashing the weights file is enough for that.
    weights_sha = quick_weights_sha256(model)
    resolved = None
    if weights_sha is None:
        resolved = resolve_model(model, model_config)
        weights_sha = resolved.weights_sha256
    cfg = config or InferenceConfig(progress=False, reader_threads=1)
    if plan is None or plan.weights_sha256 != weights_sha:
        plan = plan_batch(slides, out, weights_sha)
    table, todo = plan.table, plan.todo
    if not todo:
        return plan.result(t0)
    if resolved is None:
        resolved = resolve_model(model, model_config)  # validate once, before any slide work
    gpu = bool(gpus_per_worker) or cluster == "local-cuda"
    dashboard = None
    with connect(client=client, scheduler=scheduler, cluster=cluster, workers=workers,
                 gpus_per_worker=gpus_per_worker, slides_per_gpu=slides_per_gpu,
                 cluster_kwargs=cluster_kwargs) as c:
        dashboard = c.dashboard_link
        if todo:
            model_ref = c.scatter(resolved, broadcast=True, hash=False)  # loaded once per worker
            resources = {"GPU": 1} if gpu else None
            futures = {}
            for job in todo:
                table.update(job.key, slide=str(job.path), status="running", model_hash=resolved.weights_sha256)
                fut = c.submit(slide_task, job, str(out), model_ref, cfg, retries=retries,
                               resources=resources, pure=False, key=f"slide-{job.key}-{time.time_ns()}")
                futures[fut] = job
            bar = tqdm(total=len(todo), unit="slide", disable=not progress, desc="slides")
            tiles = 0
            for fut in as_completed(futures, loop=c.loop):
                job = futures[fut]
                try:
                    row = fut.result()
                except Exception as exc:  # exhausted retries or a killed worker: record, go on
                    row = {"slide": str(job.path), "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                row.pop("key", None)
                table.update(job.key, **row)
                tiles += int(row.get("tissue_tiles") or 0)
                bar.set_postfix(tiles=tiles, failed=table.counts().get("failed", 0))
                bar.update(1)
            bar.close()
    return plan.result(t0, dashboard)
