"""``wsi-cmaf info SLIDE``: levels, µm/px and its source, vendor, backend, tissue fraction."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

VERB = "info"
HELP = "describe a slide: levels, µm/px and its source, vendor, backend, associated images, tissue"
#: how this verb gives a slide's µm/px (see wsi_cmaf.cli.error_text)
MPP_HINT = "pass the scanner's level-0 µm/px with --mpp (e.g. --mpp 0.25)"

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    from wsi_cmaf.slide.reader import BACKENDS

    p.add_argument("slide", help="slide file (SVS, pyramidal TIFF, DICOM ...)")
    p.add_argument("--mpp", type=float, default=None,
                   help="level-0 µm/px override (wins over the file's metadata)")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="reader backend (default: auto = first that opens the file)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-tissue", action="store_true", help="skip tissue detection")


def describe(slide: str, mpp: float | None = None, backend: str = "auto",
             tissue: bool = True) -> dict[str, Any]:
    """Collect the facts ``info`` prints, as a JSON-serialisable dict."""
    from wsi_cmaf.slide import TissueConfig, detect_tissue, open_slide

    with open_slide(slide, backend=backend, mpp=mpp) as reader:
        info: dict[str, Any] = {
            "path": str(reader.path),
            "backend": reader.backend,
            "vendor": reader.vendor,
            "objective_power": reader.objective_power,
            "mpp": list(reader.mpp) if reader.has_mpp else None,
            "mpp_source": reader.mpp_source,
            "levels": [
                {
                    "level": i,
                    "width": w,
                    "height": h,
                    "downsample": round(reader.level_downsamples[i], 4),
                    "mpp": [round(v, 4) for v in reader.level_mpp(i)] if reader.has_mpp else None,
                }
                for i, (w, h) in enumerate(reader.level_dimensions)
            ],
            "associated_images": sorted(reader.associated_images),
            "fingerprint": reader.fingerprint(),
            "tissue_fraction": None,
        }
        if tissue and reader.has_mpp:
            cfg = TissueConfig()
            info["tissue_fraction"] = round(detect_tissue(reader, cfg).fraction(), 4)
            info["tissue_mpp"] = cfg.mpp
    return info


def _format(info: dict[str, Any]) -> str:
    lines = [f"slide:      {info['path']}",
             f"backend:    {info['backend']}",
             f"vendor:     {info['vendor'] or 'unknown'}",
             f"objective:  {str(info['objective_power']) + 'x' if info['objective_power'] else 'unknown'}"]
    if info["mpp"]:
        mx, my = info["mpp"]
        lines.append(f"µm/px:      {mx:.4g} x {my:.4g} (source: {info['mpp_source']})")
    else:
        lines.append("µm/px:      unknown (not in the file; pass --mpp X to set it)")
    lines.append(f"levels:     {len(info['levels'])}")
    for lv in info["levels"]:
        mpp = f"  {lv['mpp'][0]:.4g} µm/px" if lv["mpp"] else ""
        lines.append(f"  [{lv['level']}] {lv['width']} x {lv['height']}  downsample {lv['downsample']:g}{mpp}")
    lines.append(f"associated: {', '.join(info['associated_images']) or 'none'}")
    if info["tissue_fraction"] is not None:
        lines.append(f"tissue:     {100 * info['tissue_fraction']:.1f}% of the slide "
                     f"(mask at {info['tissue_mpp']:g} µm/px)")
    elif info["mpp"] is None:
        lines.append("tissue:     unknown (needs µm/px; pass --mpp X)")
    lines.append(f"fingerprint: {info['fingerprint']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the slide description; errors propagate as WsiCmafError (one line, exit 2)."""
    info = describe(args.slide, mpp=args.mpp, backend=args.backend, tissue=not args.no_tissue)
    print(json.dumps(info) if args.json else _format(info))
    return 0
