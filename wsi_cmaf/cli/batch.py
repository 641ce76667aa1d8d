"""``wsi-cmaf batch``: analyse a slide archive on dask.distributed (local, scheduler, SLURM/PBS)."""

from __future__ import annotations

import argparse
import json
import os
import signal

from wsi_cmaf.cli import add_inference_options

VERB = "batch"
HELP = "analyse many slides (paths, glob, directory or CSV) on a dask cluster, skipping finished ones"
#: how this verb gives a slide's µm/px (see wsi_cmaf.cli.error_text)
MPP_HINT = "give the scanner's level-0 µm/px (or 'estimate') in the mpp column of an input CSV (path,mpp)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("inputs", nargs="+", help="slide paths, a glob, a directory (recursive) or a CSV (path[,mpp])")
    p.add_argument("--out", required=True, help="output directory (one folder per slide + status.csv)")
    p.add_argument("--model", default=None, help="model (default: the project's default model)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, help="address of a running dask scheduler (tcp://host:8786)")
    where.add_argument("--cluster", default="local", choices=["local", "local-cuda", "slurm", "pbs"],
                       help="start a cluster of this kind (default local; local-cuda: one worker per "
                            "visible GPU, also chosen by local with --gpus-per-worker)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (local: default 2; local-cuda: default one per GPU) or jobs (slurm/pbs)")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="GPU resource per worker (0: CPU only)")
    p.add_argument("--slides-per-gpu", type=int, default=2,
                   help="slides in flight per GPU, so one's CPU stages overlap another's model (default 2)")
    p.add_argument("--slides-per-worker", type=int, default=2,
                   help="slides each CPU worker process of a local cluster analyses at once (default 2: one "
                        "slide's fixed work overlaps the other's decoding)")
    p.add_argument("--cluster-options", default=None,
                   help="JSON of extra dask-jobqueue/LocalCluster options, e.g. "
                        "'{\"queue\": \"gpu\", \"walltime\": \"04:00:00\"}'")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--retries", type=int, default=2,
                   help="times a slide is run again after a transient error or after losing its worker "
                        "(killed, preempted, out of walltime); it fails on the next loss (default 2)")
    p.add_argument("--retry-failed", action="store_true",
                   help="also retry slides that failed with an input error (unreadable, unsupported, ...) "
                        "although their file is unchanged; by default a rerun reports them from status.csv")
    p.add_argument("--dashboard", action="store_true",
                   help="start dask's dashboard, on 127.0.0.1 only (it shows slide file names); default: none")
    p.add_argument("--adapt", default=None, metavar="MIN:MAX",
                   help="slurm/pbs: scale between MIN and MAX jobs with the work left (replacing jobs that end); "
                        "default: keep --workers jobs running")
    p.add_argument("--lifetime", default="auto",
                   help="slurm/pbs: retire each worker after this long (seconds or a dask duration like 50m; "
                        "'auto': the walltime less 10%% and at least 5 minutes; 'off': never)")
    p.add_argument("--lifetime-stagger", default=None,
                   help="slurm/pbs: spread retirements by up to this much (default with auto: 5%% of the walltime)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--embeddings", action="store_true",
                   help="also store each tissue tile's embedding (input of the classifier head) in the store, "
                        "for slide-level models (wsi-cmaf train-slide); needs a registry model")
    p.add_argument("--mpp-check", choices=["on", "off"], default="on",
                   help="estimate each slide's µm/px from its nuclei and warn (status.csv mpp_ratio) when the "
                        "metadata disagree by more than 1.6x (default on); a CSV row's mpp may be 'estimate'")
    p.add_argument("--exclude-blurred", action="store_true",
                   help="leave tiles the QC flags as out of focus out of each analysis")
    p.add_argument("--no-qc", dest="qc", action="store_false",
                   help="skip the slide QC (µm/px check, out-of-focus tiles); its status.csv columns stay blank")
    add_inference_options(p, reader_threads_default=None)
    p.add_argument("--decode", default="cpu", choices=["cpu", "device"],
                   help="who decodes block pixels: cpu (the slide reader, default) or device (JPEG tiles of "
                        "TIFF/SVS slides decoded by torchvision on the model's device; other slides use cpu)")


def run(args: argparse.Namespace) -> int:
    """Run the batch and print the final summary table."""
    import time

    from wsi_cmaf.cluster.plan import plan_batch
    from wsi_cmaf.model_files import weights_file_sha256

    inputs = args.inputs if len(args.inputs) > 1 else args.inputs[0]
    # A rerun over a finished archive is answered from status.csv before torch, the model code or
    # dask are imported (seconds of imports against milliseconds of work).
    t0 = time.perf_counter()
    adapt = _parse_adapt(args.adapt)
    lifetime = None if args.lifetime == "off" else _number_or_text(args.lifetime)
    stagger = _number_or_text(args.lifetime_stagger) if args.lifetime_stagger is not None else None
    sha = weights_file_sha256(args.model)
    plan = plan_batch(inputs, args.out, sha, retry_failed=args.retry_failed) if sha is not None else None
    if plan is not None and not plan.todo:
        return _report(plan.result(t0))

    from wsi_cmaf.cluster import analyze_slides
    from wsi_cmaf.infer import InferenceConfig

    gpu = bool(args.gpus_per_worker) or args.cluster == "local-cuda"
    threads = args.reader_threads
    if threads is None:  # CPU workers: one decoder each (the model takes the cores); GPU: share the cores
        threads = max(1, (os.cpu_count() or 2) // (2 * args.slides_per_gpu)) if gpu else 1
    cfg = InferenceConfig(device=args.device, batch_size=args.batch_size, progress=False, reader_threads=threads,
                          precision=args.precision, compile=args.compile, overlay=args.overlay, geojson=args.geojson,
                          embeddings=args.embeddings, qc=args.qc, mpp_check=args.mpp_check == "on",
                          exclude_blurred=args.exclude_blurred, decode=args.decode)
    previous = signal.signal(signal.SIGTERM, _terminate)  # so SIGTERM unwinds: cluster closed, table marked
    try:
        result = analyze_slides(
            inputs, args.out, model=args.model,
            scheduler=args.scheduler, cluster=args.cluster, workers=args.workers,
            gpus_per_worker=args.gpus_per_worker, slides_per_gpu=args.slides_per_gpu,
            slides_per_worker=args.slides_per_worker,
            cluster_kwargs=json.loads(args.cluster_options) if args.cluster_options else None,
            config=cfg, retries=args.retries, retry_failed=args.retry_failed, adapt=adapt,
            dashboard=args.dashboard, lifetime=lifetime, lifetime_stagger=stagger,
            progress=not args.no_progress, plan=plan,
        )
    except (KeyboardInterrupt, BatchTerminated) as exc:
        print(f"batch {'terminated' if isinstance(exc, BatchTerminated) else 'interrupted'}: finished slides "
              f"are kept in {args.out}/status.csv; rerun the same command to finish the rest")
        return 143 if isinstance(exc, BatchTerminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _report(result)


class BatchTerminated(Exception):
    """The batch received SIGTERM (raised in the main thread so clean-up runs)."""


def _terminate(signum: int, frame: object) -> None:
    raise BatchTerminated(f"signal {signum}")


def _parse_adapt(text: str | None) -> tuple[int, int] | None:
    """``MIN:MAX`` -> (min, max) jobs; ConfigError when malformed."""
    if text is None:
        return None
    from wsi_cmaf.errors import ConfigError

    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--adapt {text!r}: give MIN:MAX jobs, e.g. 1:8") from None
    if lo < 0 or hi < max(lo, 1):
        raise ConfigError(f"--adapt {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def _number_or_text(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _report(result) -> int:
    """Print the per-slide table and the summary line; exit status 1 when a slide failed."""
    from wsi_cmaf.cluster.plan import is_permanent_error

    if result.dashboard:
        print(f"dashboard: {result.dashboard}")
    print(f"{'slide':<40} {'status':<8} {'tiles':>7} {'sec':>7}  error")
    for row in result.rows:
        name = str(row.get("key", ""))[:40]
        print(f"{name:<40} {row.get('status', ''):<8} {str(row.get('tissue_tiles', '')):>7} "
              f"{str(row.get('seconds', '')):>7}  {str(row.get('error', ''))[:100]}")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.counts.items()))
    for row in result.rows:
        if row.get("note"):
            print(f"note: {row.get('slide')}: {row['note']}")
    kept = sum(1 for r in result.rows if r.get("status") == "failed" and is_permanent_error(r.get("error_type")))
    if kept:
        print(f"{kept} slides failed with an input error (reported, not retried on an unchanged file; "
              "--retry-failed retries them)")
    print(f"{len(result.rows)} slides ({counts}); {result.skipped} skipped as already done; "
          f"{result.seconds:.1f}s; status table {result.status_path}")
    return 0 if not result.counts.get("failed") else 1
