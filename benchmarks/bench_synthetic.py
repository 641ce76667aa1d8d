"""Streaming check of the synthetic slide writer: wall time and peak RSS for a large slide.

    .venv/bin/python benchmarks/bench_synthetic.py                       # 100,000 x 80,000 px
    .venv/bin/python benchmarks/bench_synthetic.py --width 20000 --height 16000

Prints one JSON line. The slide goes to a temporary folder (or --out) and is deleted unless
--keep is given. Exit code 1 when peak RSS exceeds --max-rss-gib (default 2).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=100_000)
    p.add_argument("--height", type=int, default=80_000)
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="folder for the slide (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the slide")
    p.add_argument("--max-rss-gib", type=float, default=2.0)
    args = p.parse_args(argv)

    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    rss_before = _peak_rss_mib()
    folder = args.out or Path(tempfile.mkdtemp(prefix="wsi_cmaf_bench_synth_"))
    path = folder / f"synthetic_{args.width}x{args.height}_seed{args.seed}.tiff"
    start = time.perf_counter()
    slide = write_synthetic_slide(path, args.width, args.height, args.mpp, seed=args.seed, workers=args.workers)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()
    size = path.stat().st_size
    record = {
        "bench": "synthetic_write",
        "width": args.width,
        "height": args.height,
        "megapixels": round(args.width * args.height / 1e6, 1),
        "downsamples": list(slide.downsamples),
        "workers": args.workers,
        "seconds": round(seconds, 1),
        "megapixels_per_s": round(args.width * args.height / 1e6 / seconds, 1),
        "file_mib": round(size / 2**20, 1),
        "peak_rss_mib": round(peak, 1),
        "rss_after_imports_mib": round(rss_before, 1),
        "tumour_fraction": round(float(slide.tumour_mask.mean()), 4),
        "max_rss_gib": args.max_rss_gib,
        "pass": peak < args.max_rss_gib * 1024,
    }
    print(json.dumps(record))
    if not args.keep:
        for f in (path, slide.mask_path, slide.mask_path.with_suffix(".json") if slide.mask_path else None):
            if f is not None and f.exists():
                f.unlink()
        if args.out is None:
            folder.rmdir()
    return 0 if record["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
