"""Tile explanations: generic attributions for any model, branch maps for CMAF-Net.

Every function takes a model and a batch of preprocessed tiles (B, 3, H, W) and returns numpy
maps at tile resolution (B, H, W). Generic methods (:func:`integrated_gradients`,
:func:`occlusion`, both optionally smoothed with captum's NoiseTunnel) use captum and work for
any differentiable / callable model the engine runs; CMAF-Net maps raise
:class:`NotCMAFNetError` for other models.

Slide level: :func:`explain_store` (``wsi-cmaf explain``) picks tiles of a finished heatmap
store (:func:`choose_tiles`), re-reads them through the store's pixel pipeline
(:func:`explain_slide`) and writes a gallery PNG, a JSON and an ``explanations`` store group.
"""

from wsi_cmaf.explain.cmaf import (
    AttentionMaps,
    attention_and_gate,
    cross_attention_maps,
    gate_map,
    gradcam_contextual,
    gradcam_spatial,
)
from wsi_cmaf.explain.common import ExplainError, NotCMAFNetError
from wsi_cmaf.explain.generic import integrated_gradients, occlusion
from wsi_cmaf.explain.pointing import PointingScore, pointing_score, random_baseline
from wsi_cmaf.explain.report import explain_store
from wsi_cmaf.explain.select import TileChoice, choose_tiles
from wsi_cmaf.explain.slide import ExplainSettings, SlideExplanation, UnfinishedStoreError, explain_slide

__all__ = [
    "AttentionMaps",
    "ExplainError",
    "ExplainSettings",
    "NotCMAFNetError",
    "PointingScore",
    "SlideExplanation",
    "TileChoice",
    "UnfinishedStoreError",
    "attention_and_gate",
    "choose_tiles",
    "cross_attention_maps",
    "explain_slide",
    "explain_store",
    "gate_map",
    "gradcam_contextual",
    "gradcam_spatial",
    "integrated_gradients",
    "occlusion",
    "pointing_score",
    "random_baseline",
]
