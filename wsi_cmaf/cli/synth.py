"""``wsi-cmaf synth``: write a synthetic H&E-like pyramidal TIFF with a known tumour mask."""

from __future__ import annotations

import argparse

VERB = "synth"
HELP = "write a synthetic Aperio-style pyramidal TIFF (H&E-like tissue, ground-truth tumour mask beside it)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("out", help="output slide path (.tiff or .svs)")
    p.add_argument("--width", type=int, default=8192, help="level-0 width in px (default 8192)")
    p.add_argument("--height", type=int, default=6144, help="level-0 height in px (default 6144)")
    p.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px (default 0.25, i.e. 40x)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same slide (default 0)")
    p.add_argument("--tile", type=int, default=512, help="TIFF tile size, multiple of 16 (default 512)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--no-tumour", action="store_true", help="benign tissue only")
    p.add_argument("--blank", action="store_true", help="background only (no tissue)")
    p.add_argument("--mask-mpp", type=float, default=4.0, help="µm/px of the saved tumour mask (default 4)")
    p.add_argument("--workers", type=int, default=1, help="render threads (default 1)")


def run(args: argparse.Namespace) -> int:
    """Write the slide and print where it and its mask are."""
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    try:
        slide = write_synthetic_slide(
            args.out, args.width, args.height, args.mpp, seed=args.seed, tumour=not args.no_tumour,
            tile=args.tile, quality=args.quality, blank=args.blank, mask_mpp=args.mask_mpp,
            workers=args.workers,
        )
    except ValueError as exc:
        from wsi_cmaf.errors import ConfigError

        raise ConfigError(f"synth: {exc}") from exc
    tumour = float(slide.tumour_mask.mean())
    print(f"slide: {slide.path} ({slide.width} x {slide.height} px, {slide.mpp} µm/px, "
          f"downsamples {list(slide.downsamples)}) in {slide.seconds:.1f} s")
    print(f"tumour mask: {slide.mask_path} ({slide.tumour_mask.shape[1]} x {slide.tumour_mask.shape[0]} px "
          f"at {slide.mask_mpp} µm/px, {tumour:.1%} tumour)")
    return 0
