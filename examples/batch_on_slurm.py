"""Analyse a slide archive on SLURM with GPU workers (run on the cluster's login node).

    python examples/batch_on_slurm.py /archive/slides /scratch/results --jobs 4

Each SLURM job runs one dask worker with one GPU; finished slides are skipped on a rerun. Jobs
that end early are replaced; workers retire before the walltime (lifetime derived from it).
"""

from __future__ import annotations

import argparse

from wsi_cmaf.cluster import analyze_slides


def main() -> None:
    """Parse arguments and run the batch."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slides")
    ap.add_argument("out")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--queue", default="gpu")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    result = analyze_slides(
        args.slides, args.out, model=args.model, cluster="slurm", workers=args.jobs, gpus_per_worker=1,
        cluster_kwargs={"queue": args.queue, "cores": 8, "memory": "32GiB", "walltime": "04:00:00"},
    )
    print(result.counts, "status table:", result.status_path)


if __name__ == "__main__":
    main()
