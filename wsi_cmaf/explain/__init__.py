"""Tile explanations: generic attributions for any model, branch maps for CMAF-Net.

Every function takes a model and a batch of preprocessed tiles (B, 3, H, W) and returns numpy
maps at tile resolution (B, H, W). Generic methods (:func:`integrated_gradients`,
:func:`occlusion`) use captum and work for any differentiable / callable model the engine runs;
CMAF-Net maps raise :class:`NotCMAFNetError` for other models.
"""

from wsi_cmaf.explain.cmaf import (
    AttentionMaps,
    cross_attention_maps,
    gate_map,
    gradcam_contextual,
    gradcam_spatial,
)
from wsi_cmaf.explain.common import ExplainError, NotCMAFNetError
from wsi_cmaf.explain.generic import integrated_gradients, occlusion
from wsi_cmaf.explain.pointing import PointingScore, pointing_score, random_baseline

__all__ = [
    "AttentionMaps",
    "ExplainError",
    "NotCMAFNetError",
    "PointingScore",
    "cross_attention_maps",
    "gate_map",
    "gradcam_contextual",
    "gradcam_spatial",
    "integrated_gradients",
    "occlusion",
    "pointing_score",
    "random_baseline",
]
