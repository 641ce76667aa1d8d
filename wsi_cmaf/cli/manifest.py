"""``wsi-cmaf manifest``: build, generate, validate and resample training manifests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VERB = "manifest"
HELP = ("build (IDC, BreakHis), generate (synthetic), validate or resample a training manifest, or cut "
        "labelled patches (with context views) from annotated slides")
#: how this verb gives a slide's µm/px (see wsi_cmaf.cli.error_text)
MPP_HINT = "slide-patches reads the µm/px from the slide files only: use slides whose files record it"


def _fractions(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected three comma-separated fractions, e.g. 0.7,0.1,0.2")
    return parts[0], parts[1], parts[2]


def _view(text: str) -> dict[str, float | int]:
    try:
        mpp, size = text.split(":")
        return {"mpp": float(mpp), "size": int(size)}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a view is MPP:SIZE, e.g. 16:50 (50 px at 16 µm/px), got {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands: idc, breakhis, synthetic, validate, resample, slide-patches."""
    sub = parser.add_subparsers(dest="kind", metavar="KIND")
    sub.required = True
    for kind, what in (("idc", "an IDC tree PATIENT/{0,1}/*.png"), ("breakhis", "a BreakHis v1 tree")):
        p = sub.add_parser(kind, help=f"manifest of {what} with patient-level splits")
        p.add_argument("root", type=Path, help="dataset root folder")
        p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
        p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
        p.add_argument("--fractions", type=_fractions, default=(0.7, 0.1, 0.2), help="train,val,test (0.7,0.1,0.2)")
        p.add_argument("--absolute", action="store_true", help="write absolute paths (default: relative to --out)")
        p.add_argument("--strict", action="store_true",
                       help="refuse the dataset when any file is malformed (exit 2, every bad file listed) "
                            "instead of leaving it out")
        p.add_argument("--rejects", type=Path, default=None,
                       help="CSV of the files left out, with the reason (default: <out stem>_rejects.csv)")
    p = sub.add_parser("synthetic", help="generate synthetic H&E-like patches with a manifest")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--patients", type=int, default=20)
    p.add_argument("--per-patient", type=int, default=100, help="patches per patient")
    p.add_argument("--ratio", default="70:30", help="negative:positive over all patches (exact)")
    p.add_argument("--signal", type=float, default=0.5, help="class signal strength, 0 = none, 1 = clear")
    p.add_argument("--stain-variation", type=float, default=1.0, help="scale of per-patient stain shifts")
    p.add_argument("--patch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=_fractions, default=(0.7, 0.1, 0.2))
    p.add_argument("--format", choices=("png", "zarr", "both"), default="png",
                   help="IDC-layout PNGs, a packed Zarr patch store, or both")
    p = sub.add_parser("slide-patches", help="cut labelled tiles (and context views) from annotated slides "
                                             "into a patch store for `wsi-cmaf train`")
    p.add_argument("slides", type=Path, help="CSV: slide, split (train/val/test)[, mask, mask_mpp]; without a mask "
                                             "column the ground truth beside a `wsi-cmaf synth` slide is used")
    p.add_argument("--out", type=Path, required=True, help="patch store (.zarr) to write")
    p.add_argument("--tile-mpp", type=float, default=4.0, help="tile spacing, µm/px (default 4)")
    p.add_argument("--tile", type=int, default=50, help="tile size, px (default 50)")
    p.add_argument("--view", type=_view, action="append", default=[], metavar="MPP:SIZE",
                   help="a context view stored beside each tile, e.g. 16:50 (repeatable): a multi-view store")
    p.add_argument("--positive-min", type=float, default=0.5, help="tumour fraction for label 1 (default 0.5)")
    p.add_argument("--negative-max", type=float, default=0.05, help="tumour fraction for label 0 (default 0.05)")
    p = sub.add_parser("validate", help="check a manifest; lists every problem")
    p.add_argument("manifest", type=Path)
    p.add_argument("--root", type=Path, default=None, help="root of relative paths (default: manifest folder)")
    p.add_argument("--decode", action="store_true", help="decode every image (finds corrupt files; slower)")
    p.add_argument("--num-classes", type=int, default=2)
    p = sub.add_parser("resample", help="undersample the training split to a majority:minority ratio")
    p.add_argument("manifest", type=Path)
    p.add_argument("--ratio", required=True, help="e.g. 95:5")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)


def _summary(frame) -> str:
    counts = frame.groupby(["split", "label"]).size().unstack(fill_value=0)
    patients = frame.groupby("split")["patient_id"].nunique()
    lines = [f"{s}: {int(patients.get(s, 0))} patients, " + ", ".join(
        f"label {int(k)}: {int(v)}" for k, v in counts.loc[s].items()) for s in counts.index]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen sub-command."""
    from wsi_cmaf.train.data import manifest as mf

    if args.kind in ("idc", "breakhis"):
        from wsi_cmaf.train.data.builders import scan_breakhis, scan_idc

        scan = scan_idc if args.kind == "idc" else scan_breakhis
        rel = None if args.absolute else args.out.resolve().parent
        built = scan(args.root.resolve(), seed=args.seed, fractions=args.fractions, relative_to=rel,
                     strict=args.strict)
        mf.write_manifest(built.frame, args.out)
        rejects = args.rejects or args.out.with_name(f"{args.out.stem}_rejects.csv")
        rejects.parent.mkdir(parents=True, exist_ok=True)
        built.rejects.to_csv(rejects, index=False, lineterminator="\n")
        print(f"{built.summary()}; wrote {args.out}, rejects in {rejects}\n{_summary(built.frame)}")
        return 0
    if args.kind == "synthetic":
        from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, write_synthetic_dataset

        config = SyntheticPatchConfig(
            n_patients=args.patients, patches_per_patient=args.per_patient, ratio=args.ratio,
            signal=args.signal, stain_variation=args.stain_variation, patch_size=args.patch_size, seed=args.seed)
        formats = ("png", "zarr") if args.format == "both" else (args.format,)
        written = write_synthetic_dataset(args.out_dir, config, formats=formats, fractions=args.fractions)
        frame = mf.read_manifest(written["manifest"], check_images="exists" if "png" in formats else "none").frame
        print("\n".join(f"wrote {k}: {v}" for k, v in written.items()) + "\n" + _summary(frame))
        return 0
    if args.kind == "slide-patches":
        from wsi_cmaf.slide import GridConfig
        from wsi_cmaf.train.data.slide_patches import build_slide_patch_store, read_slide_table

        counts = build_slide_patch_store(read_slide_table(args.slides), args.out,
                                         GridConfig(mpp=args.tile_mpp, tile_size=args.tile), context=args.view,
                                         positive_min=args.positive_min, negative_max=args.negative_max)
        views = "" if not args.view else " with views " + ", ".join(f"{v['size']} px at {v['mpp']:g} µm/px"
                                                                  for v in args.view)
        print(f"wrote {args.out}{views}\n" + "\n".join(f"{k}: {v['patches']} patches, {v['tumour']} tumour"
                                                     for k, v in counts.items()))
        return 0
    if args.kind == "validate":
        m = mf.read_manifest(args.manifest, root=args.root, classes=range(args.num_classes),
                             check_images="decode" if args.decode else "exists")
        print(f"{args.manifest}: OK, {len(m)} rows\n{_summary(m.frame)}")
        return 0
    if args.kind == "resample":
        from wsi_cmaf.train.data.imbalance import resample_to_ratio

        m = mf.read_manifest(args.manifest, check_images="none")
        frame, report = resample_to_ratio(m.frame, args.ratio, seed=args.seed)
        if args.out.resolve().parent != args.manifest.resolve().parent:
            # keep relative paths valid from the new manifest's folder
            frame["path"] = [str(mf.resolve(m.root, p).resolve()) for p in frame["path"]]
        mf.write_manifest(frame, args.out)
        print(f"wrote {args.out}: {report}\n" + json.dumps(report.to_dict()))
        return 0
    raise AssertionError(args.kind)  # pragma: no cover - argparse restricts choices

