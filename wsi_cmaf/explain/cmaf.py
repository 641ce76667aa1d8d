"""CMAF-Net-specific maps: Grad-CAM per branch, cross-attention per head with tau, the gate.

These read CMAF-Net's internals (``spatial``, ``contextual``, ``cmaf`` and the aux dict of
``forward_with_aux``), so they refuse any other architecture with :class:`NotCMAFNetError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerGradCam
from torch import nn

from wsi_cmaf.explain.common import (
    ExplainError,
    NotCMAFNetError,
    Target,
    check_batch,
    eval_mode,
    resolve_target,
    to_tile,
    unwrap,
)
from wsi_cmaf.models.cmaf_block import CMAFBlock
from wsi_cmaf.models.cmaf_net import CMAFNet


def require_cmaf(model: nn.Module, part: str) -> CMAFNet:
    """The CMAF-Net behind ``model``, checking it has ``part``; named errors otherwise."""
    net = unwrap(model)
    if not isinstance(net, CMAFNet):
        raise NotCMAFNetError(f"{part} maps exist only for CMAF-Net, not {type(net).__name__}; "
                              "use integrated_gradients or occlusion for other models")
    if getattr(net, part, None) is None:
        raise ExplainError(f"this CMAF-Net has no {part!r} part (ablation {net.config.branches}/"
                           f"{net.config.fusion})")
    return net


def _hw(x: torch.Tensor) -> tuple[int, int]:
    """(H, W) of an image batch."""
    return int(x.shape[-2]), int(x.shape[-1])


def _block(net: CMAFNet) -> CMAFBlock:
    """The CMAF block (require_cmaf(model, "cmaf") has checked that there is one)."""
    assert net.cmaf is not None
    return net.cmaf


def _gradcam(model: nn.Module, x: torch.Tensor, target: Target, part: str, relu: bool) -> np.ndarray:
    check_batch(x)
    net = require_cmaf(model, part)
    with eval_mode(net):
        tgt = resolve_target(net, x, target)
        cam = LayerGradCam(net, getattr(net, part)).attribute(x, target=tgt, relu_attributions=relu)
    return to_tile(cam[:, 0], _hw(x))


def gradcam_spatial(model: nn.Module, x: torch.Tensor, target: Target = None, relu: bool = True) -> np.ndarray:
    """Grad-CAM on the spatial branch's last stage F_s (after skips and spatial attention) -> (B, H, W)."""
    return _gradcam(model, x, target, "spatial", relu)


def gradcam_contextual(model: nn.Module, x: torch.Tensor, target: Target = None,
                       relu: bool = True) -> np.ndarray:
    """Grad-CAM on the contextual (MobileViT) branch's output F_t -> (B, H, W)."""
    return _gradcam(model, x, target, "contextual", relu)


@dataclass
class AttentionMaps:
    """Cross-attention of the CMAF block for a batch.

    ``received``: (B, heads, H, W) attention each key location receives, averaged over queries,
    at tile resolution. ``attn``: raw (B, heads, Nq, Nk) maps on the token grid ``grid``.
    ``tau``: per-head temperature (heads,). ``entropy``: per-head mean row entropy (nats).
    """

    received: np.ndarray
    attn: np.ndarray
    tau: np.ndarray
    entropy: np.ndarray
    grid: tuple[int, int]


def _aux_with_grid(net: CMAFNet, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    grid: list[tuple[int, int]] = []
    # The token grid is F_s's, read from the block's input (it depends on size rounding).
    hook = _block(net).register_forward_pre_hook(lambda _m, args: grid.append(tuple(args[0].shape[-2:])))
    try:
        with eval_mode(net), torch.no_grad():
            _, aux = net.forward_with_aux(x)
    finally:
        hook.remove()
    return aux, (int(grid[0][0]), int(grid[0][1]))


def _attention_from_aux(aux: dict[str, torch.Tensor], grid: tuple[int, int], size: tuple[int, int]) -> AttentionMaps:
    attn = aux["attn"].float()
    received = attn.mean(dim=2).unflatten(-1, grid)  # (B, H, h, w)
    return AttentionMaps(
        received=to_tile(received, size),
        attn=attn.cpu().numpy(),
        tau=aux["tau"].detach().float().cpu().numpy(),
        entropy=aux["attn_entropy"].detach().float().cpu().numpy(),
        grid=grid,
    )


def cross_attention_maps(model: nn.Module, x: torch.Tensor) -> AttentionMaps:
    """Per-head cross-attention maps of the CMAF block with their temperatures tau."""
    check_batch(x)
    net = require_cmaf(model, "cmaf")
    aux, grid = _aux_with_grid(net, x)
    return _attention_from_aux(aux, grid, _hw(x))


def gate_map(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Mean gate g over channels -> (B, H, W): 1 = the location used the fused (cross-attended)
    features, 0 = it kept its spatial-branch features."""
    check_batch(x)
    net = require_cmaf(model, "cmaf")
    if _block(net).gate is None:
        raise ExplainError("this CMAF-Net has no gate (the 'no_gating' ablation mixes 50:50)")
    aux, _ = _aux_with_grid(net, x)
    return to_tile(aux["gate"].float().mean(dim=1), _hw(x))


def attention_and_gate(model: nn.Module, x: torch.Tensor) -> tuple[AttentionMaps, np.ndarray | None]:
    """:func:`cross_attention_maps` and :func:`gate_map` from one forward pass; the gate is None
    for the 'no_gating' ablation."""
    check_batch(x)
    net = require_cmaf(model, "cmaf")
    aux, grid = _aux_with_grid(net, x)
    size = _hw(x)
    gate = None if _block(net).gate is None else to_tile(aux["gate"].float().mean(dim=1), size)
    return _attention_from_aux(aux, grid, size), gate
