"""Explaining multi-view and multi-task models tile by tile.

The attributions (captum) take one input tensor. A multi-view model is explained as a function of
its tile view (view 0, the tile at the heatmap's magnification) with the context views and the
missing-view mask held fixed: captum passes them as ``additional_forward_args`` and expands them
with the input (integration steps, noise samples, occlusion windows), so every call sees each
tile with its own context. The maps therefore say which pixels *of the tile* moved the
probability given its context; how much the context itself counted is the gated attention weight
over the views, reported beside the maps. A multi-task model is explained on its primary task.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TileViewForward", "view_weights"]


class TileViewForward(nn.Module):
    """``forward(tile, *context_views, missing)`` -> the primary task's logits (B, C)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tile: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if rest:  # context views, then the (B, V) mask
            *context, missing = rest
            out = self.model([tile, *context], missing)
        else:
            out = self.model(tile)
        if isinstance(out, dict):  # several tasks: the first is the primary one
            out = next(iter(out.values()))
        return out


@torch.no_grad()
def view_weights(model: nn.Module, views: list[torch.Tensor], missing: torch.Tensor) -> torch.Tensor:
    """Gated attention weight of each view per tile (B, V); 0 where a view is missing.

    ``model``: a :class:`~wsi_cmaf.models.multiview.MultiViewNet`, compiled or not; any other
    model raises :class:`~wsi_cmaf.explain.common.ExplainError`.
    """
    from wsi_cmaf.explain.common import ExplainError, unwrap
    from wsi_cmaf.models.multiview import MultiViewNet

    net = unwrap(model)
    if not isinstance(net, MultiViewNet):
        raise ExplainError(f"view weights come from a multi-view model's gated attention; "
                           f"{type(net).__name__} has none")
    return net.fuse(views, missing)[1]
