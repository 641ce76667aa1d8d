"""Slide- and patient-level prediction from stored tile embeddings.

* :func:`read_embeddings`: a store's tile embeddings (written by ``analyze_slide(..., embeddings=True)``).
* :class:`GatedAttentionMIL`: gated attention-MIL pooling (Ilse et al. 2018).
* :class:`ClinicalSchema` / :class:`ClinicalEncoder`: declared clinical variables and their encoding.
* :class:`SlideModel`: cross-attention fusion and its image-only, clinical-only and concatenation baselines.
* :func:`train_slide` / :func:`predict_slide`: the workflows behind ``wsi-cmaf train-slide`` / ``predict-slide``.

Exports load on first use (PEP 562).
"""

from __future__ import annotations

from wsi_cmaf._lazy import lazy_exports

_EXPORTS = {
    "read_embeddings": "wsi_cmaf.slidelevel.bags",
    "write_attention_map": "wsi_cmaf.slidelevel.bags",
    "read_attention_map": "wsi_cmaf.slidelevel.bags",
    "GatedAttentionMIL": "wsi_cmaf.slidelevel.mil",
    "pad_bags": "wsi_cmaf.slidelevel.mil",
    "ClinicalSchema": "wsi_cmaf.slidelevel.clinical",
    "ClinicalEncoder": "wsi_cmaf.slidelevel.clinical",
    "SlideModel": "wsi_cmaf.slidelevel.fusion",
    "SlideTrainConfig": "wsi_cmaf.slidelevel.train",
    "load_slide_model": "wsi_cmaf.slidelevel.train",
    "train_slide": "wsi_cmaf.slidelevel.workflows",
    "predict_slide": "wsi_cmaf.slidelevel.workflows",
    "clinical_shap": "wsi_cmaf.slidelevel.attribution",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
