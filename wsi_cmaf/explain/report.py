"""Files of a slide explanation: the per-slide JSON, and :func:`explain_store` that writes them all."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsi_cmaf.errors import OutputError
from wsi_cmaf.explain.slide import ExplainSettings, SlideExplanation, explain_slide

logger = logging.getLogger(__name__)


def saliency_summary(m: np.ndarray) -> dict[str, Any]:
    """A few numbers that say where one (H, W) map points: mean |value|, the share of |value|
    in the top 10 % of pixels (1 = concentrated, 0.1 = flat), the peak's (y, x) in map pixels,
    and the share of the total that is positive (evidence for the class)."""
    a = np.abs(np.asarray(m, dtype=np.float64))
    total = float(a.sum())
    flat = np.sort(a.ravel())[::-1]
    top = flat[: max(1, flat.size // 10)].sum()
    peak = np.unravel_index(int(a.argmax()), a.shape)
    pos = float(np.clip(m, 0, None).sum())
    return {"abs_mean": round(float(a.mean()), 8), "top10_mass": round(top / total, 4) if total > 0 else None,
            "peak_yx": [int(peak[0]), int(peak[1])],
            "positive_share": round(pos / total, 4) if total > 0 else None}


def report_dict(expl: SlideExplanation, outputs: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The per-slide JSON document (see :func:`explain_store`)."""
    ch = expl.choice
    s = expl.settings
    tiles = []
    for i in range(len(ch)):
        x, y, w, h = (int(v) for v in expl.location[i])
        entry: dict[str, Any] = {
            "index": i, "reason": ch.reason[i], "row": int(ch.rows[i]), "col": int(ch.cols[i]),
            "x": x, "y": y, "w": w, "h": h, "probability": round(float(ch.probability[i]), 6),
            "probability_recomputed": round(float(expl.recomputed[i]), 6),
            "saliency": {name: saliency_summary(m[i]) for name, m in expl.saliency.items()},
        }
        if expl.attention is not None:
            peak = np.unravel_index(int(expl.attention[i].argmax()), expl.attention[i].shape)
            entry["attention_peak_yx"] = [int(peak[0]), int(peak[1])]
        if expl.gate is not None:
            entry["gate_mean"] = round(float(expl.gate[i].mean()), 4)
        if expl.view_weights is not None:
            entry["view_weights"] = [round(float(w), 4) for w in expl.view_weights[i]]
        tiles.append(entry)
    return {
        "slide": str(Path(expl.slide).absolute()), "store": str(Path(expl.store).absolute()),
        "class": expl.class_names[expl.positive_class], "decision_threshold": expl.threshold,
        "top_k": sum(r == "top_k" for r in ch.reason), "n_tiles": len(ch),
        "model": expl.model,
        "maps": {"saliency": list(expl.saliency), "cmaf": expl.is_cmaf,
                 "attention": "mean over heads of the attention each location receives" if expl.attention is not None
                 else None,
                 "gate": "mean gate over channels (1 = fused features)" if expl.gate is not None else None},
        "views": ({"views": expl.views, "maps": "of the tile view (view 0), its context held fixed",
                   "view_weights": "gated attention weight of each view (0 = missing)"}
                  if expl.views is not None else None),
        "tau": None if expl.tau is None else [round(float(t), 5) for t in expl.tau],
        "note": expl.cmaf_note,
        "settings": {"methods": list(s.methods), "ig_steps": s.steps, "target_class": expl.positive_class,
                     "noise_tunnel": ({"type": s.nt_type, "samples": s.nt_samples, "stdev_fraction": s.nt_stdev}
                                      if s.nt_samples else None),
                     "map_size": list(expl.map_size), "map_um_per_px": expl.tile_um / expl.map_size[1]},
        "tiles": tiles, "warnings": list(expl.warnings),
        "outputs": {k: str(v) for k, v in outputs.items()},
        "provenance": provenance,
    }


def explain_store(store: str | Path, slide: str | Path | None = None, model: Any = None, *,
                  out: str | Path | None = None, model_config: Any = None, top_k: int = 32,
                  threshold: float | None = None,
                  settings: ExplainSettings | None = None, write_store: bool = True,
                  call: str | None = None) -> tuple[SlideExplanation, dict[str, Path]]:
    """Explain a finished store (:func:`explain_slide`) and write its files.

    Into ``out`` (default: ``<slide stem>_explain`` beside the store): ``<stem>_explain.png``
    (the gallery) and ``<stem>_explain.json`` (chosen tiles, scores, saliency summaries,
    provenance); with ``write_store`` the maps also go into the store as ``explanations/<map>``.
    Returns the explanation and the written paths.
    """
    from wsi_cmaf.explain.gallery import render_gallery
    from wsi_cmaf.explain.store_maps import GROUP, write_explanation_group
    from wsi_cmaf.output.provenance import export_provenance
    from wsi_cmaf.output.store import HeatmapStore

    expl = explain_slide(store, slide, model, model_config=model_config, top_k=top_k, threshold=threshold,
                         settings=settings)
    stem = Path(expl.store).name.removesuffix(".zarr")
    out_dir = Path(out) if out is not None else Path(expl.store).parent / f"{stem}_explain"
    paths: dict[str, Path] = {"gallery": render_gallery(expl, out_dir / f"{stem}_explain.png")}
    json_path = out_dir / f"{stem}_explain.json"
    prov = export_provenance(HeatmapStore.open(expl.store), json_path, call=call)
    if write_store:
        for name in expl.saliency:
            attrs = {"map": name, "class": expl.class_names[expl.positive_class], "threshold": expl.threshold,
                     "tau": None if expl.tau is None else expl.tau.tolist(), "note": expl.cmaf_note,
                     "settings": report_dict(expl, {}, {})["settings"], "model": expl.model, "provenance": prov}
            paths[f"store_{name}"] = write_explanation_group(expl, name, attrs)
    doc = report_dict(expl, paths, prov)
    doc["store_group"] = GROUP if write_store else None
    try:
        json_path.write_text(json.dumps(doc, indent=1))
    except OSError as exc:
        raise OutputError(f"cannot write {json_path}: {exc}") from exc
    paths["json"] = json_path
    return expl, paths
