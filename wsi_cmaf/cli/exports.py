"""``wsi-cmaf export tiles``: per-tile table of a heatmap store as QuPath GeoJSON, CSV or Parquet."""

from __future__ import annotations

import argparse

from wsi_cmaf.cli import add_global_flags

VERB = "export"
HELP = "export a heatmap store per tile: QuPath GeoJSON tile objects, CSV or Parquet tile table"

_SUFFIX = {"geojson": ".geojson", "csv": ".csv", "parquet": ".parquet"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options (one sub-verb, ``tiles``)."""
    sub = p.add_subparsers(dest="what", metavar="WHAT")
    sub.required = True
    t = sub.add_parser("tiles", help="one row/object per tissue tile with per-class probabilities",
                       description="One row (CSV/Parquet) or QuPath object (GeoJSON) per tissue tile: level-0 "
                                   "x, y, w, h, grid row/col, tissue fraction, prob_<class> per class.")
    add_global_flags(t)  # -q/-v/--debug also after the sub-verb
    t.add_argument("store", help="heatmap store written by `wsi-cmaf analyze` (<slide>.zarr)")
    t.add_argument("--format", default="geojson", choices=list(_SUFFIX),
                   help="geojson (QuPath tile objects, probabilities as measurements), csv or parquet "
                        "(needs pyarrow); default geojson")
    t.add_argument("--out", default=None, help="output file (default: <store>_tiles.<format> beside the store)")
    t.add_argument("--object-type", default="tile", choices=["tile", "detection"],
                   help="QuPath object type of the GeoJSON features (default tile)")


def run(args: argparse.Namespace) -> int:
    """Write the export and print its path and row count."""
    from pathlib import Path

    from wsi_cmaf.cli import require_path
    from wsi_cmaf.errors import UsageError
    from wsi_cmaf.output.store import HeatmapStore
    from wsi_cmaf.output.tiles import tile_table, write_tiles

    require_path(args.store, "heatmap store")
    store_path = Path(args.store)
    out = Path(args.out) if args.out else store_path.with_name(store_path.stem + "_tiles" + _SUFFIX[args.format])
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name (e.g. {out / ('tiles' + _SUFFIX[args.format])})")
    store = HeatmapStore.open(store_path)
    path = write_tiles(store, out, args.format, object_type=args.object_type)
    if not args.quiet:
        print(f"{path} ({len(tile_table(store))} tissue tiles)")
    return 0
