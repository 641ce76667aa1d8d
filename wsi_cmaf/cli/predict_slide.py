"""``wsi-cmaf predict-slide``: slide/patient predictions and MIL attention maps from a trained slide model."""

from __future__ import annotations

import argparse

from wsi_cmaf.cli import require_path

VERB = "predict-slide"
HELP = "predict slides/patients with a model from `train-slide`; write attention maps into the stores"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("model", help="folder written by train-slide")
    p.add_argument("manifest", help="CSV: store[, patient][, label]")
    p.add_argument("--clinical", default=None,
                   help="clinical CSV; patients without a row (or without it) are predicted image-only")
    p.add_argument("--out", default=None, help="predictions CSV (default: print the table)")
    p.add_argument("--no-attention", action="store_true", help="do not write the MIL attention maps into the stores")
    p.add_argument("--encoder", default=None,
                   help="read the embeddings of this encoder (wsi-cmaf embed) from each store folder's encoders/<name>")


def run(args: argparse.Namespace) -> int:
    """Predict and print (or write) the per-patient table."""
    from wsi_cmaf.slidelevel.workflows import predict_slide

    require_path(args.model, "slide model folder")
    require_path(args.manifest, "manifest")
    if args.clinical is not None:
        require_path(args.clinical, "clinical table")
    table = predict_slide(args.model, args.manifest, clinical=args.clinical, out_csv=args.out,
                          write_attention_maps=not args.no_attention, encoder_name=args.encoder)
    if not args.quiet:
        print(table.to_string(index=False) if args.out is None else f"{len(table)} patients -> {args.out}")
    return 0
