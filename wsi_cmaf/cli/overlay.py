"""``wsi-cmaf overlay``: draw a heatmap store over its slide's thumbnail as a PNG."""

from __future__ import annotations

import argparse

VERB = "overlay"
HELP = "draw a heatmap store (.zarr) over the slide thumbnail as a PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("store", help="heatmap store written by `wsi-cmaf analyze` (<slide>.zarr)")
    p.add_argument("--slide", default=None,
                   help="slide file (default: the path recorded in the store; heatmap alone if missing)")
    p.add_argument("--out", default=None, help="output PNG (default: <store>_overlay.png beside the store)")
    p.add_argument("--class-index", type=int, default=None,
                   help="class to draw (default: the model's positive class)")
    p.add_argument("--threshold", type=float, default=0.5, help="outline regions with p >= this (default 0.5)")
    p.add_argument("--alpha", type=float, default=0.75,
                   help="heatmap opacity at p = 1; it falls with p (default 0.75)")
    p.add_argument("--mode", default="continuous", choices=["continuous", "threshold"],
                   help="continuous colour ramp, or only tiles with p >= --threshold in one colour")
    p.add_argument("--cmap", default="teal-yellow",
                   help="colour map: teal-yellow (default, contrasts with H&E) or a matplotlib colour map name")
    p.add_argument("--thumbnail-mpp", type=float, default=None, help="thumbnail µm/px (default: as fine as the map)")


def run(args: argparse.Namespace) -> int:
    """Write the overlay and print its path."""
    from wsi_cmaf.cli import require_path
    from wsi_cmaf.output.overlay import overlay

    require_path(args.store, "heatmap store")
    path = overlay(args.store, slide=args.slide, out_png=args.out, class_index=args.class_index,
                   thumbnail_mpp=args.thumbnail_mpp, alpha=args.alpha, threshold=args.threshold, cmap=args.cmap,
                   mode=args.mode)
    if not args.quiet:
        print(path)
    return 0
