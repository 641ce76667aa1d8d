"""``wsi-cmaf train-slide``: train a slide/patient-level model on stored tile embeddings."""

from __future__ import annotations

import argparse
import json

from wsi_cmaf.cli import require_path

VERB = "train-slide"
HELP = ("train an attention-MIL slide/patient model (optionally fused with clinical data) on a manifest of "
        "stores made with `analyze --embeddings`")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("manifest", help="CSV: store, label[, patient][, split=train|test]")
    p.add_argument("--out", required=True, help="folder for the model, predictions.csv and metrics.json")
    p.add_argument("--clinical", default=None, help="clinical CSV (a 'patient' column + the schema's variables)")
    p.add_argument("--schema", default=None, help="clinical schema (JSON or YAML): name, type, categories")
    p.add_argument("--kind", default=None, choices=["fusion", "image", "clinical", "concat"],
                   help="model (default: fusion with --clinical, else image)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16, help="patients per step")
    p.add_argument("--modality-dropout", type=float, default=0.3,
                   help="probability of hiding a training patient's clinical data (fusion, concat, clinical)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-attention", action="store_true", help="do not write the MIL attention maps into the stores")
    p.add_argument("--encoder", default=None,
                   help="read the embeddings of this encoder (wsi-cmaf embed) from each store folder's encoders/<name>")


def run(args: argparse.Namespace) -> int:
    """Train, save, predict; print the metrics."""
    from wsi_cmaf.slidelevel.train import SlideTrainConfig
    from wsi_cmaf.slidelevel.workflows import train_slide

    require_path(args.manifest, "manifest")
    for path, what in ((args.clinical, "clinical table"), (args.schema, "clinical schema")):
        if path is not None:
            require_path(path, what)
    cfg = SlideTrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           modality_dropout=args.modality_dropout, seed=args.seed)
    metrics = train_slide(args.manifest, args.out, kind=args.kind, clinical=args.clinical, schema=args.schema,
                          config=cfg, write_attention_maps=not args.no_attention, encoder_name=args.encoder)
    if not args.quiet:
        print(json.dumps(metrics, indent=2))
    return 0
