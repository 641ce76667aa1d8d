"""``wsi-cmaf verify``: check that a heatmap store still holds what its runs wrote."""

from __future__ import annotations

import argparse

VERB = "verify"
HELP = "check a heatmap store (.zarr) against the manifest its runs wrote; exit 1 naming damaged blocks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("store", help="heatmap store written by `wsi-cmaf analyze` (<slide>.zarr)")
    p.add_argument("--deep", action="store_true",
                   help="reread every done block and compare its checksum and tile count (default: only list "
                        "the chunk files and compare their sizes, which reads no data)")


def run(args: argparse.Namespace) -> int:
    """Print the report; 0 when every done block matches, 1 when some are damaged."""
    from wsi_cmaf.cli import require_path
    from wsi_cmaf.output.verify import verify_store

    require_path(args.store, "heatmap store")
    report = verify_store(args.store, deep=args.deep)
    lines = report.lines()
    if report.ok:
        if not args.quiet:
            print("\n".join(lines))
        return 0
    print("\n".join(lines))
    return 1
