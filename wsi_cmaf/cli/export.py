"""``wsi-cmaf geojson``: export regions above a threshold as a QuPath-compatible GeoJSON."""

from __future__ import annotations

import argparse

VERB = "geojson"
HELP = "export regions of a heatmap store above a probability threshold as GeoJSON (level-0 px)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("store", help="heatmap store written by `wsi-cmaf analyze` (<slide>.zarr)")
    p.add_argument("--out", default=None, help="output file (default: <store>_regions.geojson beside the store)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--class-index", type=int, default=None,
                   help="class to export (default: the model's positive class)")
    p.add_argument("--name", default=None, help="QuPath classification name (default: the class name)")
    p.add_argument("--min-tiles", type=int, default=1, help="drop regions smaller than this many tiles")
    p.add_argument("--fill-holes", action="store_true", help="write exterior rings only")


def run(args: argparse.Namespace) -> int:
    """Write the GeoJSON and print its path and the number of regions."""
    import json
    from pathlib import Path

    from wsi_cmaf.cli import require_path
    from wsi_cmaf.output.geojson import write_geojson

    require_path(args.store, "heatmap store")
    store = Path(args.store)
    out = Path(args.out) if args.out else store.with_name(store.stem + "_regions.geojson")
    path = write_geojson(store, out, threshold=args.threshold, class_index=args.class_index,
                         class_name=args.name, min_tiles=args.min_tiles, fill_holes=args.fill_holes)
    n = len(json.loads(path.read_text())["features"])
    if not args.quiet:
        print(f"{path} ({n} region(s))")
    return 0
