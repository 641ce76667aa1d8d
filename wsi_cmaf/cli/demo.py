"""``wsi-cmaf demo``: make the built-in synthetic slide and analyse it end to end."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

VERB = "demo"
HELP = "generate the built-in synthetic demo slide (known tumour region) and analyse it end to end"

logger = logging.getLogger(__name__)

DEMO_SLIDE = {"width": 24_000, "height": 16_000, "mpp": 0.25, "seed": 7}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("--out", default="wsi_cmaf_demo", help="output directory (default ./wsi_cmaf_demo)")
    p.add_argument("--model", default=None, help="model to run (default: the project's default model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-progress", action="store_true")


def _tumour_agreement(result, slide) -> dict[str, float] | None:
    """How well the heatmap separates the known tumour tiles from the rest (AUROC)."""
    import numpy as np
    from skimage.transform import resize
    from sklearn.metrics import roc_auc_score

    from wsi_cmaf.output.store import HeatmapStore

    store = HeatmapStore.open(result.store)
    probs = store.probabilities(0)[1]
    truth = resize(slide.tumour_mask.astype(np.float32), probs.shape, order=1, anti_aliasing=True) > 0.5
    ok = np.isfinite(probs)
    if truth[ok].all() or not truth[ok].any():
        return None
    return {"auroc": float(roc_auc_score(truth[ok], probs[ok])),
            "tumour_tiles": int(truth[ok].sum()), "tissue_tiles": int(ok.sum())}


def run(args: argparse.Namespace) -> int:
    """Write (or reuse) the demo slide, analyse it, print where everything is."""
    from wsi_cmaf.infer import InferenceConfig, analyze_slide
    from wsi_cmaf.slide.synthetic import load_synthetic_slide, write_synthetic_slide

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slide_path = out / "demo_slide.tiff"
    params_path = out / "demo_slide.json"
    slide = None
    if slide_path.is_file() and params_path.is_file() and json.loads(params_path.read_text()) == DEMO_SLIDE:
        slide = load_synthetic_slide(slide_path)
    if slide is None:
        print(f"writing the synthetic demo slide {slide_path} ({DEMO_SLIDE['width']}x{DEMO_SLIDE['height']} px "
              f"at {DEMO_SLIDE['mpp']} µm/px) ...", flush=True)
        slide = write_synthetic_slide(slide_path, int(DEMO_SLIDE["width"]), int(DEMO_SLIDE["height"]),
                                      DEMO_SLIDE["mpp"], seed=int(DEMO_SLIDE["seed"]), tumour=True)
        params_path.write_text(json.dumps(DEMO_SLIDE))
    cfg = InferenceConfig(device=args.device, batch_size=args.batch_size, progress=not args.no_progress)
    result = analyze_slide(slide_path, model=args.model, out=out / "results", overwrite=True, config=cfg)
    print()
    print("\n".join(result.summary_lines()))
    agreement = _tumour_agreement(result, slide)
    if agreement is not None:
        print(f"tumour check    AUROC {agreement['auroc']:.3f} of the heatmap against the known tumour "
              f"region ({agreement['tumour_tiles']} of {agreement['tissue_tiles']} tissue tiles are tumour)")
    print()
    print(f"weights         {result.weights_note}")
    if "untrained" in result.weights_note.lower():
        print("NOTE: these weights are UNTRAINED (random). The heatmap shows the pipeline working, "
              "not a diagnosis; its probabilities mean nothing.")
    elif "synthetic" in result.weights_note.lower():
        print("NOTE: these weights were trained on the project's SYNTHETIC patches only. They show the "
              "pipeline working on the synthetic demo slide; they are not a diagnostic model.")
    print(f"outputs are in  {out.resolve()}")
    return 0
