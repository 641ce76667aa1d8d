"""``wsi-cmaf explain``: saliency, attention and gate maps of a slide's most telling tiles."""

from __future__ import annotations

import argparse

VERB = "explain"
HELP = ("explain a heatmap store: the k most malignant tiles and the k nearest the decision threshold, "
        "re-read from the slide, with saliency (and, for CMAF-Net, attention and gate) maps")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("store", help="finished heatmap store written by `wsi-cmaf analyze` (<slide>.zarr)")
    p.add_argument("--slide", default=None, help="the slide the store was made from (default: the path it records)")
    p.add_argument("--model", default=None,
                   help="the model the store was made with (default: the project's default model); "
                        "its weights must match the store's")
    p.add_argument("--top-k", type=int, default=32,
                   help="explain the k most malignant tiles plus the k nearest the threshold (default 32)")
    p.add_argument("--method", action="append", choices=["ig", "occlusion", "gradcam"], default=None,
                   help="saliency method, repeatable (default ig = Integrated Gradients; gradcam: CMAF-Net only)")
    p.add_argument("--smoothgrad", type=int, default=0, metavar="N",
                   help="average ig/occlusion over N noisy copies of each tile (captum NoiseTunnel; default 0 = off)")
    p.add_argument("--noise", type=float, default=0.15,
                   help="SmoothGrad noise std as a fraction of the input range (default 0.15)")
    p.add_argument("--steps", type=int, default=32, help="Integrated Gradients steps (default 32)")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold for the near-threshold tiles (default: the store's)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--batch", type=int, default=4, help="tiles explained at once (default 4)")
    p.add_argument("--out", default=None, help="output folder (default: <slide>_explain beside the store)")
    p.add_argument("--no-store", dest="write_store", action="store_false",
                   help="do not add the maps to the store (gallery and JSON only)")


def run(args: argparse.Namespace) -> int:
    """Explain the store and print where the gallery, JSON and store group went."""
    from wsi_cmaf.cli import require_path
    from wsi_cmaf.errors import UsageError
    from wsi_cmaf.explain.report import explain_store
    from wsi_cmaf.explain.slide import ExplainSettings

    require_path(args.store, "heatmap store")
    if args.slide is not None:
        require_path(args.slide, "slide")
    if args.top_k <= 0:
        raise UsageError(f"--top-k must be a positive number of tiles, got {args.top_k}")
    settings = ExplainSettings(methods=tuple(args.method or ["ig"]), steps=args.steps, nt_samples=args.smoothgrad,
                               nt_stdev=args.noise, batch=args.batch, device=args.device)
    expl, paths = explain_store(args.store, args.slide, args.model, out=args.out, top_k=args.top_k,
                                threshold=args.threshold, settings=settings, write_store=args.write_store)
    if not args.quiet:
        n_top = sum(r == "top_k" for r in expl.choice.reason)
        print(f"explained {len(expl.choice)} tiles ({n_top} top-k, {len(expl.choice) - n_top} near the "
              f"threshold {expl.threshold:g}) with {', '.join(expl.saliency)}")
        print("maps: " + ("saliency, cross-attention (mean over heads) and gate" if expl.is_cmaf
                          else f"generic only ({expl.cmaf_note})"))
        for key, path in paths.items():
            print(f"{key:<18} {path}")
        for w in expl.warnings:
            print(f"warning: {w}")
    return 0
