"""``wsi-cmaf embed``: a foundation-model encoder's tile embeddings for one slide or an archive."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_cmaf.cli import add_inference_options, require_path

VERB = "embed"
HELP = ("embed the tissue tiles of a slide, folder, glob or CSV with a foundation-model encoder "
        "(local weights, resumable, local or SLURM/PBS)")
EXPORTS = ("h5ad", "h5")
#: how this verb gives a slide's µm/px (see wsi_cmaf.cli.error_text)
MPP_HINT = "pass the scanner's level-0 µm/px with --mpp (one slide), or in the input CSV's mpp column"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("inputs", nargs="+", help="a slide, several slides, a glob, a directory (recursive) or a CSV")
    p.add_argument("--encoder", required=True, help="registered encoder (wsi-cmaf encoders) or timm:<architecture>")
    p.add_argument("--weights", default=None,
                   help="checkpoint file or folder (timm/HF folder or HF cache entry); default: the HF cache")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch the weights from the Hugging Face hub if they are not local (never by default)")
    p.add_argument("--random-weights", action="store_true",
                   help="run with random weights (pipeline tests and throughput only: the embeddings mean nothing)")
    p.add_argument("--input-size", type=int, default=None, help="timm: encoders only: input size in px (default 224)")
    p.add_argument("--encoder-mpp", type=float, default=None,
                   help="timm: encoders only: µm/px tiles are cut at (default 0.5)")
    p.add_argument("--out", required=True, help="output directory (stores go to <slide>.zarr/encoders/<name>)")
    p.add_argument("--export", action="append", default=[], choices=EXPORTS,
                   help="also write <slide>_<encoder>.h5ad (AnnData) and/or .h5 (TRIDENT/CLAM features); repeatable")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mpp", type=float, default=None, help="one slide only: override its level-0 µm/px")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, help="address of a running dask scheduler")
    where.add_argument("--cluster", default="local", choices=["local", "local-cuda", "slurm", "pbs"],
                       help="batch engine cluster for several slides (default local)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--gpus-per-worker", type=int, default=0)
    p.add_argument("--slides-per-gpu", type=int, default=2)
    p.add_argument("--cluster-options", default=None, help="JSON of extra dask-jobqueue/LocalCluster options")
    add_inference_options(p, reader_threads_default=None)


def _single(args: argparse.Namespace) -> bool:
    return len(args.inputs) == 1 and Path(args.inputs[0]).is_file() and Path(args.inputs[0]).suffix.lower() != ".csv"


def run(args: argparse.Namespace) -> int:
    """Embed and print where the stores are."""
    from wsi_cmaf.encoders.embed import embed_config, embed_slide, embed_slides, resolve_encoder
    from wsi_cmaf.infer import InferenceConfig

    if _single(args):
        require_path(args.inputs[0], "slide")
    loaded = resolve_encoder(args.encoder, args.weights, allow_download=args.allow_download,
                             random_weights=args.random_weights, input_size=args.input_size, mpp=args.encoder_mpp)
    cfg = InferenceConfig(device=args.device, batch_size=args.batch_size, progress=not args.quiet and _single(args),
                          reader_threads=args.reader_threads or (2 if _single(args) else 1),
                          precision=args.precision, compile=args.compile)
    say = (lambda *a: None) if args.quiet else print  # noqa: E731  (-q: errors only)
    say(f"encoder {loaded.spec.name}: {loaded.dim}-dim, {loaded.spec.input_size} px at {loaded.spec.mpp} µm/px; "
          f"{loaded.note}; licence {loaded.spec.licence}")
    stores: list[Path] = []
    if _single(args):
        res = embed_slide(args.inputs[0], loaded, args.out, config=cfg, mpp=args.mpp)
        stores.append(Path(res.store))
        say(f"{res.tiles_tissue} tiles embedded into {res.store} ({res.blocks_computed} blocks computed, "
              f"{res.blocks_skipped} resumed)")
        failed = 0
    else:
        inputs = args.inputs if len(args.inputs) > 1 else args.inputs[0]
        result = embed_slides(inputs, args.out, loaded, config=embed_config(cfg, loaded.spec.name),
                              scheduler=args.scheduler, cluster=args.cluster, workers=args.workers,
                              gpus_per_worker=args.gpus_per_worker, slides_per_gpu=args.slides_per_gpu,
                              cluster_kwargs=json.loads(args.cluster_options) if args.cluster_options else None,
                              progress=not args.quiet)
        for row in result.rows:
            say(f"{str(row.get('key', ''))[:40]:<40} {row.get('status', ''):<8} {row.get('tissue_tiles', '')!s:>7}"
                  f"  {str(row.get('error', ''))[:100]}")
            if row.get("status") in ("done", "partial") and row.get("output"):
                stores.append(Path(row["output"]))
        failed = result.counts.get("failed", 0)
        say(f"{len(result.rows)} slides ({result.counts}); {result.skipped} skipped as already done; "
              f"status table {result.status_path}")
    _exports(stores, args, say)
    return 1 if failed else 0


def _exports(stores: list[Path], args: argparse.Namespace, say) -> None:
    if not args.export:
        return
    from wsi_cmaf.encoders.embed import safe_name
    from wsi_cmaf.encoders.export import export_anndata, export_h5

    for store in stores:
        slide_dir = store.parent.parent.parent  # <dir>/<slide>.zarr/encoders/<name>
        stem = store.parent.parent.name.removesuffix(".zarr")
        base = slide_dir / f"{stem}_{safe_name(args.encoder)}"
        if "h5ad" in args.export:
            say(f"wrote {export_anndata(store, base.with_suffix('.h5ad'))}")
        if "h5" in args.export:
            say(f"wrote {export_h5(store, base.with_suffix('.h5'), name=stem)}")


def add_encoder_options(p: argparse.ArgumentParser) -> None:
    """``--encoder`` / ``--encoder-weights`` / ``--allow-download`` for verbs that embed alongside (analyze)."""
    p.add_argument("--encoder", default=None,
                   help="also embed the tissue tiles with this foundation-model encoder (wsi-cmaf encoders) "
                        "into <slide>.zarr/encoders/<name>, beside the heatmap, as wsi-cmaf embed does")
    p.add_argument("--encoder-weights", default=None,
                   help="checkpoint file or folder of --encoder (default: the Hugging Face cache)")
    p.add_argument("--allow-download", action="store_true",
                   help="let --encoder fetch its weights from the Hugging Face hub (never by default)")


def load_encoder_option(args: argparse.Namespace):
    """The ``--encoder`` of ``args`` loaded (None without one): before any slide work, so missing
    weights fail at once."""
    if not getattr(args, "encoder", None):
        return None
    from wsi_cmaf.encoders.embed import resolve_encoder

    return resolve_encoder(args.encoder, args.encoder_weights, allow_download=args.allow_download)


def embed_alongside(loaded, slide: str, out_dir: str | Path, cfg, *, mpp: float | None = None):
    """Embed ``slide`` with ``loaded`` into the same output folder as a heatmap just written."""
    from wsi_cmaf.encoders.embed import embed_config, embed_slide

    ecfg = embed_config(cfg, loaded.spec.name)
    return embed_slide(slide, loaded, out_dir, config=ecfg, mpp=mpp)
