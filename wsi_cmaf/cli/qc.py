"""``wsi-cmaf qc``: slide quality control (µm/px from the nuclei, marker ink, out-of-focus tiles)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

VERB = "qc"
HELP = "check a slide: µm/px estimated from its nuclei against the metadata, marker ink, out-of-focus tiles"

logger = logging.getLogger(__name__)

#: how the verbs with add_mpp_options give a slide's µm/px (see wsi_cmaf.cli.error_text)
MPP_HINT = "pass the scanner's level-0 µm/px with --mpp (e.g. --mpp 0.25), or --mpp estimate to measure it"


def mpp_value(text: str) -> float | str:
    """``--mpp``: a number of µm/px or the word ``estimate``."""
    if text.strip().lower() == "estimate":
        return "estimate"
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--mpp takes a number of µm/px or 'estimate', not {text!r}") from exc


def add_mpp_options(p: argparse.ArgumentParser, help_default: str) -> None:
    """``--mpp VALUE|estimate`` and ``--mpp-check on|off`` (shared by the verbs that open slides)."""
    p.add_argument("--mpp", type=mpp_value, default=None,
                   help="level-0 µm/px: a number overrides the slide's metadata; 'estimate' measures it from "
                        f"the nuclei in the image ({help_default})")
    p.add_argument("--mpp-check", choices=["on", "off"], default="on",
                   help="estimate the µm/px from the nuclei and warn when the metadata disagree by more than "
                        "1.6x (default on; 8 sampled tiles)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("slide", help="slide file (SVS, TIFF, NDPI, DICOM ...)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default ./wsi_cmaf_qc/<slide>)")
    add_mpp_options(p, "default: the metadata, or the estimate when the slide has none")
    p.add_argument("--tile-mpp", type=float, default=2.0, help="µm/px of the QC tile grid (default 2.0)")
    p.add_argument("--tile-size", type=int, default=64, help="QC tile size in px at --tile-mpp (default 64)")
    p.add_argument("--backend", default="auto", help="auto | openslide | tiffslide | wsidicom")


def run(args: argparse.Namespace) -> int:
    """Run the QC and write ``<slide>_qc.json`` and ``<slide>_qc.png``."""
    from wsi_cmaf.cli import require_path
    from wsi_cmaf.qc.picture import write_picture
    from wsi_cmaf.qc.report import run_qc
    from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide

    require_path(args.slide, "slide file")
    slide = Path(args.slide)
    out = args.out if args.out is not None else Path.cwd() / "wsi_cmaf_qc" / slide.stem
    with open_slide(slide, backend=args.backend, mpp=args.mpp) as probe:
        missing = not probe.has_mpp
    mpp = "estimate" if missing and args.mpp is None else args.mpp
    extra = []
    if missing and args.mpp is None:
        extra.append("the slide has no µm/px metadata: QC used the µm/px estimated from its nuclei")
    with open_slide(slide, backend=args.backend, mpp=mpp) as reader:
        tissue = detect_tissue(reader)
        grid = TileGrid.from_slide(reader, GridConfig(mpp=args.tile_mpp, tile_size=args.tile_size), tissue)
        qc = run_qc(reader, grid, tissue, mpp_check=args.mpp_check == "on")
        qc.warnings[:0] = extra
        w0, h0 = reader.level_dimensions[0]
        width, height = w0 * reader.mpp[0], h0 * reader.mpp[1]
        thumb = reader.thumbnail(max(max(width, height) / 1600.0, min(reader.mpp)))
    import json

    out.mkdir(parents=True, exist_ok=True)
    report = {"slide": str(slide.absolute()), **qc.to_dict()}
    json_path = out / f"{slide.stem}_qc.json"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(json_path)  # never half a report
    png = write_picture(thumb, (width, height), grid, tissue, qc, f"{slide.name}: slide QC",
                        out / f"{slide.stem}_qc.png")
    if not args.quiet:
        est = report["mpp_estimate"]
        print(f"slide: {slide} (µm/px {report['mpp_used'][0]:.4g}, {report['mpp_source']})")
        print("µm/px estimated from nuclei: " + ("not computed" if est is None else
              f"{est:.3g} ({report['mpp_estimate_interval'][0]:.3g}-{report['mpp_estimate_interval'][1]:.3g}, "
              f"{report['mpp_estimate_nuclei']} nuclei)"))
        print(f"ink: {report['ink_fraction']:.1%} of tissue, {report['ink_tiles']} mostly-ink tiles")
        print(f"out of focus: {report['blurred_tiles']} of {report['tissue_tiles']} tissue tiles")
        for w in report["warnings"]:
            print(f"warning: {w}")
        print(f"report: {json_path}\npicture: {png}")
    return 0
