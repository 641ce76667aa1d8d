"""``analyze_slides``: many slides on a dask.distributed cluster, one task per slide.

Why one task per slide and not per block: a slide task reuses the single-slide code path
(so a batch heatmap is bit-identical to ``analyze_slide``), keeps all of a slide's tile data on
the worker that reads it (no tile transfer between workers), and gives archives of many slides
full parallelism; see the closing measurements in benchmarks/README.md.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

from distributed import Client, as_completed
from tqdm.auto import tqdm

from wsi_cmaf.cluster.engine import connect
from wsi_cmaf.cluster.inputs import SlideJob
from wsi_cmaf.cluster.plan import BatchPlan, BatchResult, current_fingerprint, plan_batch
from wsi_cmaf.cluster.worker_model import ModelRef, load_model_ref, make_model_ref
from wsi_cmaf.errors import ConfigError, WsiCmafError
from wsi_cmaf.infer.callargs import merge_run_config
from wsi_cmaf.infer.config import InferenceConfig
from wsi_cmaf.infer.modelspec import quick_weights_sha256, resolve_model

logger = logging.getLogger(__name__)

__all__ = ["BatchResult", "analyze_slides", "slide_task"]


def slide_task(job: SlideJob, out_dir: str, model: ModelRef, cfg: InferenceConfig) -> dict[str, Any]:
    """Analyse one slide on a worker. Bad slides return a 'failed' row; transient errors raise (retried).

    The worker loads the model from ``model`` itself (once per process), so a slide never waits
    on data held by another worker. Its blocks are read by the process's shared reader pool
    (:func:`~wsi_cmaf.cluster.worker_pool.shared_reader_pool`), so slides in flight on one worker
    interleave their reads and no slide starts or stops a pool of its own.
    """
    from wsi_cmaf.cluster.worker_pool import shared_reader_pool
    from wsi_cmaf.infer import analyze_slide
    from wsi_cmaf.qc.report import status_fields

    t0 = time.perf_counter()
    row: dict[str, Any] = {"slide": str(job.path), "key": job.key, "model_hash": model.sha256}
    try:
        row["fingerprint"] = current_fingerprint(job.path)
        resolved = load_model_ref(model)
        with shared_reader_pool():
            result = analyze_slide(job.path, model=resolved, out=Path(out_dir) / job.key, mpp=job.mpp,
                                   resume=True, config=cfg)
    except WsiCmafError as exc:  # a property of the slide or the run: recorded, the batch goes on
        row.update(status="failed", error=str(exc), error_type=type(exc).__name__,
                   seconds=round(time.perf_counter() - t0, 3))
        return row
    row.update(status="done" if not result.blocks_failed else "partial", error="; ".join(result.warnings),
               error_type="", tissue_tiles=result.tiles_tissue, seconds=round(time.perf_counter() - t0, 3),
               output=str(result.store), **status_fields(result))
    return row


def analyze_slides(
    inputs: str | Path | list[str | Path],
    out: str | Path,
    model: Any = None,
    *,
    config: InferenceConfig | None = None,
    model_config: Any = None,
    client: Client | None = None,
    scheduler: str | None = None,
    cluster: str = "local",
    workers: int | None = None,
    gpus_per_worker: int = 0,
    slides_per_gpu: int = 2,
    slides_per_worker: int = 2,
    cluster_kwargs: dict[str, Any] | None = None,
    retries: int = 2,
    retry_failed: bool = False,
    adapt: tuple[int, int] | None = None,
    dashboard: bool = False,
    lifetime: str | int | None = "auto",
    lifetime_stagger: str | int | None = None,
    progress: bool = True,
    plan: BatchPlan | None = None,
    status_name: str = "status.csv",
    **overrides: Any,
) -> BatchResult:
    """Analyse every slide of ``inputs`` into ``out/<key>/``, tracking them in ``out/status.csv``.

    ``inputs``: a list of slides, a glob, a folder or a CSV (``path[,mpp]``). ``model``, ``config``
    and the keyword ``overrides`` of :class:`InferenceConfig` fields mean what they mean for
    :func:`~wsi_cmaf.infer.analyze_slide`; without ``config`` a slide runs with one reader thread
    and no progress bar of its own (``progress`` here is the batch's bar over slides).

    Completed slides (same file fingerprint, same model) are skipped; partial ones resume chunk by
    chunk. A slide that cannot be read fails alone with its error recorded, and is not tried again
    on a rerun while its file is unchanged, unless ``retry_failed``. When nothing is left to do, no
    model is loaded and no cluster is started.

    A slide whose worker is lost (killed, preempted, out of walltime) is run again on another
    worker or a replacement job, up to ``retries`` times; a transient error inside the task is
    retried as often. Each worker loads the model itself, so losing one loses nothing else.

    GPU workers (``gpus_per_worker`` > 0, or ``cluster="local-cuda"``) run ``slides_per_gpu``
    slides at once per GPU; a local cluster then gets one worker process per visible GPU. CPU
    workers of a local cluster run ``slides_per_worker`` slides at once (their worker threads),
    sharing one reader pool: one slide's tissue mask, stain fit, store set-up and exports overlap
    the other's decoding, and memory stays bounded by that many slides per process.
    ``adapt`` = (min, max) jobs scales a SLURM/PBS cluster with the work left; ``lifetime`` and
    ``lifetime_stagger`` retire its workers before their walltime ("auto": derived from it).
    ``dashboard`` starts dask's dashboard, on 127.0.0.1 only.
    ``plan``: :func:`~wsi_cmaf.cluster.plan.plan_batch` of these inputs and ``out`` made by the
    caller (the CLI's rerun check); reused when planned for the same weights, so the slides are not
    fingerprinted twice.
    """
    t0 = time.perf_counter()
    if slides_per_worker < 1:
        raise ConfigError(f"slides_per_worker must be >= 1, got {slides_per_worker}; give how many slides "
                          "each CPU worker process analyses at once")
    cfg = merge_run_config(config, overrides, base=InferenceConfig(progress=False, reader_threads=1),
                           caller="analyze_slides")
    out = Path(out)
    # The status table alone decides what is left: hashing the weights file is enough for that.
    weights_sha = quick_weights_sha256(model)
    resolved = None
    if weights_sha is None:
        resolved = resolve_model(model, model_config)
        weights_sha = resolved.weights_sha256
    if plan is None or plan.weights_sha256 != weights_sha:
        plan = plan_batch(inputs, out, weights_sha, retry_failed=retry_failed, status_name=status_name)
    if not plan.todo:
        return plan.result(t0)
    if resolved is None:
        resolved = resolve_model(model, model_config)  # validate once, before any slide work
    ref = make_model_ref(resolved, model, model_config, out)
    del resolved  # the client keeps no model: workers load their own
    gpu = bool(gpus_per_worker) or cluster == "local-cuda"
    kwargs = dict(cluster_kwargs or {})
    if cluster in ("slurm", "pbs"):
        import dask

        # The run's worker credentials, and the jobs' own stdout/stderr (else written into the
        # caller's folder), on the file system the jobs share: unless the site's config says where.
        if not dask.config.get(f"jobqueue.{cluster}.shared-temp-directory", None):
            tls_dir = out / ".wsi-cmaf-tls"
            tls_dir.mkdir(mode=0o700, exist_ok=True)
            kwargs.setdefault("shared_temp_directory", str(tls_dir))
        if not dask.config.get(f"jobqueue.{cluster}.log-directory", None):
            kwargs.setdefault("log_directory", str(out / ".wsi-cmaf-logs"))
    link = None
    with connect(client=client, scheduler=scheduler, cluster=cluster, workers=workers,
                 threads_per_worker=slides_per_worker, gpus_per_worker=gpus_per_worker,
                 slides_per_gpu=slides_per_gpu, cluster_kwargs=kwargs,
                 retries=retries, adapt=adapt, dashboard=dashboard, lifetime=lifetime,
                 lifetime_stagger=lifetime_stagger) as c:
        link = c.dashboard_link if dashboard else None
        _run(c, plan, out, ref, cfg, retries=retries, resources={"GPU": 1} if gpu else None, progress=progress)
    plan.sync_aliases()
    return plan.result(t0, link)


def _run(c: Client, plan: BatchPlan, out: Path, ref: ModelRef, cfg: InferenceConfig, *, retries: int,
         resources: dict[str, int] | None, progress: bool) -> None:
    """Submit the slides still to do and record each outcome; resubmit slides whose task was lost."""
    table = plan.table
    pending: dict[Any, SlideJob] = {}
    attempts: dict[str, int] = {}

    def submit(job: SlideJob) -> Any:
        attempts[job.key] = attempts.get(job.key, 0) + 1
        table.update(job.key, slide=str(job.path), status="running", model_hash=ref.sha256,
                     attempts=attempts[job.key], note="")
        fut = c.submit(slide_task, job, str(out), ref, cfg, retries=retries, resources=resources, pure=False,
                       key=f"slide-{job.key}-{time.time_ns()}")
        pending[fut] = job
        return fut

    ac = as_completed([submit(job) for job in plan.todo], loop=c.loop)
    bar = tqdm(total=len(plan.todo), unit="slide", disable=not progress, desc="slides")
    tiles = 0
    try:
        for fut in ac:
            job = pending.pop(fut)
            try:
                row = fut.result()
            except CancelledError as exc:  # the task itself was dropped (e.g. the scheduler forgot it)
                if attempts[job.key] <= retries:
                    logger.warning("%s: its task was cancelled (%s); submitting it again", job.key, exc)
                    ac.add(submit(job))
                    continue
                row = _failed(job, exc)
            except Exception as exc:  # retries exhausted, or its worker lost too often (KilledWorker)
                row = _failed(job, exc)
            row.pop("key", None)
            table.update(job.key, **row)
            tiles += int(row.get("tissue_tiles") or 0)
            bar.set_postfix(tiles=tiles, failed=table.counts().get("failed", 0))
            bar.update(1)
    finally:
        bar.close()
        if pending:  # interrupted (Ctrl-C, SIGTERM): nothing in flight may look finished
            for fut, job in pending.items():
                fut.cancel()
                table.update(job.key, status="interrupted", error="the batch was interrupted; rerun it to finish")
            logger.warning("batch interrupted with %d slides unfinished; rerun the same command to finish them",
                           len(pending))


def _failed(job: SlideJob, exc: BaseException) -> dict[str, Any]:
    return {"slide": str(job.path), "status": "failed", "error": f"{type(exc).__name__}: {exc}",
            "error_type": type(exc).__name__}
