"""``wsi-cmaf analyze``: run a model over one slide and write the heatmap store and pictures."""

from __future__ import annotations

import argparse
import sys

from wsi_cmaf.cli import add_inference_options
from wsi_cmaf.cli.embed import add_encoder_options, embed_alongside, load_encoder_option
from wsi_cmaf.cli.qc import MPP_HINT as MPP_HINT  # this verb's advice for a slide without µm/px
from wsi_cmaf.cli.qc import add_mpp_options

VERB = "analyze"
HELP = "analyse a slide: tissue tiles -> model -> OME-Zarr heatmap, overlay PNG, GeoJSON"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("slide", help="path of the whole-slide image")
    p.add_argument("--model", default=None,
                   help="registry name, weights directory/.safetensors or TorchScript file "
                        "(default: the project's default model)")
    p.add_argument("--model-config", default=None, help="JSON config for a TorchScript model")
    p.add_argument("--out", default=None, help="output directory (default ./wsi_cmaf_results/<slide>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=256)
    add_mpp_options(p, "default: the slide's metadata")
    p.add_argument("--exclude-blurred", action="store_true",
                   help="leave tiles the QC flags as out of focus out of the analysis (flagged in qc/blur either way)")
    p.add_argument("--no-qc", dest="qc", action="store_false",
                   help="skip the slide QC (µm/px check, out-of-focus tiles) in the store and summary")
    p.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide", "wsidicom"])
    p.add_argument("--stain", default="auto", choices=["auto", "macenko", "none"],
                   help="stain normalisation (auto: as the model config says)")
    add_inference_options(p, reader_threads_default=2)
    p.add_argument("--decode", default="cpu", choices=["cpu", "device"],
                   help="who decodes block pixels: cpu (the slide reader, default) or device (JPEG tiles of "
                        "TIFF/SVS slides decoded by torchvision on the model's device; other slides use cpu)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="compute only blocks not done in an existing store (default)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse to reuse an existing store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--wait-lock", action="store_true",
                   help="when another run is writing the same store, wait for it instead of failing at once")
    p.add_argument("--embeddings", action="store_true",
                   help="also store each tissue tile's embedding (input of the classifier head) in the store, "
                        "for slide-level models (wsi-cmaf train-slide); needs a registry model")
    add_encoder_options(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--progress", action="store_true",
                   help="show the progress bar even when stderr is not a terminal (default: only on a terminal)")


def show_progress(args: argparse.Namespace) -> bool | str:
    """``InferenceConfig.progress``: "always" with --progress, else a bar only on a terminal and
    never with -q/--no-progress."""
    if getattr(args, "progress", False):
        return "always"
    return not (args.quiet or args.no_progress) and sys.stderr.isatty()


def run(args: argparse.Namespace) -> int:
    """Run the analysis and print its summary (nothing with -q)."""
    from wsi_cmaf.infer import InferenceConfig, analyze_slide

    cfg = InferenceConfig(
        device=args.device, batch_size=args.batch_size, progress=show_progress(args),
        stain=None if args.stain == "auto" else args.stain, precision=args.precision,
        compile=args.compile, reader_threads=args.reader_threads, overlay=args.overlay, geojson=args.geojson,
        embeddings=args.embeddings, qc=args.qc, mpp_check=args.mpp_check == "on",
        exclude_blurred=args.exclude_blurred, decode=args.decode,
    )
    encoder = load_encoder_option(args)  # a missing checkpoint fails before the analysis
    result = analyze_slide(
        args.slide, model=args.model, out=args.out, model_config=args.model_config, mpp=args.mpp,
        backend=args.backend, resume=args.resume, overwrite=args.overwrite, config=cfg,
        wait_lock=args.wait_lock,
    )
    if not args.quiet:
        print("\n".join(result.summary_lines()))
    if encoder is not None:
        emb = embed_alongside(encoder, args.slide, result.store.parent, cfg, mpp=getattr(args, "mpp", None))
        if not args.quiet:
            print(f"embeddings   {encoder.spec.name}: {emb.tiles_tissue} tiles -> {emb.store}")
    return 0
