"""``wsi-cmaf export regions|tiles|overlay``: files made from a heatmap store.

``regions``: the areas above a probability threshold as QuPath GeoJSON; ``tiles``: one row or
object per tissue tile (GeoJSON, CSV, Parquet); ``overlay``: the heatmap over the slide's
thumbnail as a PNG. Each reads the store only; none changes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_cmaf.cli import add_global_flags, require_path

VERB = "export"
HELP = "export a heatmap store: regions (GeoJSON), tiles (GeoJSON, CSV, Parquet) or overlay (PNG)"

_SUFFIX = {"geojson": ".geojson", "csv": ".csv", "parquet": ".parquet"}
_STORE_HELP = "heatmap store written by `wsi-cmaf analyze` (<slide>.zarr)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the sub-verbs and their options."""
    sub = p.add_subparsers(dest="what", metavar="WHAT")
    sub.required = True
    _add_regions(sub.add_parser("regions", help="regions above a probability threshold as QuPath GeoJSON "
                                                "(level-0 px)"))
    _add_tiles(sub.add_parser("tiles", help="one row/object per tissue tile with per-class probabilities",
                              description="One row (CSV/Parquet) or QuPath object (GeoJSON) per tissue tile: "
                                          "level-0 x, y, w, h, grid row/col, tissue fraction, prob_<class> per "
                                          "class."))
    _add_overlay(sub.add_parser("overlay", help="the heatmap drawn over the slide thumbnail as a PNG"))


def _add_regions(p: argparse.ArgumentParser) -> None:
    add_global_flags(p)  # -q/-v/--debug also after the sub-verb
    p.add_argument("store", help=_STORE_HELP)
    p.add_argument("--out", default=None, help="output file (default: <store>_regions.geojson beside the store)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--class-index", type=int, default=None,
                   help="class to export (default: the model's positive class)")
    p.add_argument("--name", default=None, help="QuPath classification name (default: the class name)")
    p.add_argument("--min-tiles", type=int, default=1, help="drop regions smaller than this many tiles")
    p.add_argument("--fill-holes", action="store_true", help="write exterior rings only")
    p.set_defaults(_export=_regions)


def _add_tiles(p: argparse.ArgumentParser) -> None:
    add_global_flags(p)
    p.add_argument("store", help=_STORE_HELP)
    p.add_argument("--format", default="geojson", choices=list(_SUFFIX),
                   help="geojson (QuPath tile objects, probabilities as measurements), csv or parquet "
                        "(needs pyarrow); default geojson")
    p.add_argument("--out", default=None, help="output file (default: <store>_tiles.<format> beside the store)")
    p.add_argument("--object-type", default="tile", choices=["tile", "detection"],
                   help="QuPath object type of the GeoJSON features (default tile)")
    p.set_defaults(_export=_tiles)


def _add_overlay(p: argparse.ArgumentParser) -> None:
    add_global_flags(p)
    p.add_argument("store", help=_STORE_HELP)
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
    p.add_argument("--thumbnail-mpp", type=float, default=None,
                   help="thumbnail µm/px (default: as fine as the map)")
    p.set_defaults(_export=_overlay)


def run(args: argparse.Namespace) -> int:
    """Write the chosen export and print what was written (nothing with -q)."""
    require_path(args.store, "heatmap store")
    line = args._export(args)
    if not args.quiet:
        print(line)
    return 0


def _regions(args: argparse.Namespace) -> str:
    import json

    from wsi_cmaf.output.geojson import write_geojson

    store = Path(args.store)
    out = Path(args.out) if args.out else store.with_name(store.stem + "_regions.geojson")
    path = write_geojson(store, out, threshold=args.threshold, class_index=args.class_index,
                         class_name=args.name, min_tiles=args.min_tiles, fill_holes=args.fill_holes)
    return f"{path} ({len(json.loads(path.read_text())['features'])} region(s))"


def _tiles(args: argparse.Namespace) -> str:
    from wsi_cmaf.errors import UsageError
    from wsi_cmaf.output.store import HeatmapStore
    from wsi_cmaf.output.tiles import tile_table, write_tiles

    store_path = Path(args.store)
    out = Path(args.out) if args.out else store_path.with_name(store_path.stem + "_tiles" + _SUFFIX[args.format])
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name (e.g. {out / ('tiles' + _SUFFIX[args.format])})")
    store = HeatmapStore.open(store_path)
    path = write_tiles(store, out, args.format, object_type=args.object_type)
    return f"{path} ({len(tile_table(store))} tissue tiles)"


def _overlay(args: argparse.Namespace) -> str:
    from wsi_cmaf.output.overlay import overlay

    path = overlay(args.store, slide=args.slide, out_png=args.out, class_index=args.class_index,
                   thumbnail_mpp=args.thumbnail_mpp, alpha=args.alpha, threshold=args.threshold, cmap=args.cmap,
                   mode=args.mode)
    return str(path)
