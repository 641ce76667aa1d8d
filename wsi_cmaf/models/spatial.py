"""Spatial branch of CMAF-Net (paper Sec. 4.2): ResNet-18 + multi-stage skips + spatial attention."""

from __future__ import annotations

import logging
from typing import cast

import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from timm.models._features import FeatureListNet
from torch import nn

from wsi_cmaf.models.blocking import cpu_chunk_size, run_blocked

logger = logging.getLogger(__name__)


def resample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring a feature map to ``size``: area pooling when shrinking, bilinear when growing.

    Area pooling (not strided sampling) keeps every earlier-stage location's contribution, which
    is the point of a skip connection that carries fine detail.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SpatialAttention(nn.Module):
    """CBAM-style spatial attention: sigmoid(conv([mean_c(x); max_c(x)])) * x."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, 1, h, w) map in [0, 1] that multiplies the features."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Re-weight every location of ``x`` by its attention value."""
        return x * self.attention_map(x)


class SpatialBranch(nn.Module):
    """ResNet trunk (timm, random init) -> F_s (B, 512, H/32, W/32).

    Earlier stages reach the final map through 1x1 conv + BN after area-resampling to the final
    grid (the paper says "1x1 convolutions and upsampling"; the earlier maps are *larger*, so they
    must be brought down to the 7x7 grid the paper states for F_s).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        skip_stages: tuple[int, ...] = (1, 2, 3),
        spatial_attention: bool = True,
        attention_kernel: int = 7,
    ) -> None:
        super().__init__()
        self.trunk = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)
        )
        # every features_only model carries feature_info; timm types create_model as a plain Module
        channels = cast(FeatureInfo, self.trunk.feature_info).channels()
        self.out_channels = channels[-1]
        self.skip_stages = tuple(sorted(set(skip_stages)))
        skips = []
        for s in self.skip_stages:
            bn = nn.BatchNorm2d(self.out_channels)
            # Start as plain ResNet: zero-init the BN scale so skips are learned in, not forced in.
            nn.init.zeros_(bn.weight)
            skips.append(nn.Sequential(nn.Conv2d(channels[s - 1], self.out_channels, 1, bias=False), bn))
        self.skips = nn.ModuleList(skips)
        self.attention = SpatialAttention(attention_kernel) if spatial_attention else None
        #: Images per chunk for the trunk's stem and first stage on CPU in eval mode
        #: (``blocking.cpu_chunk_size``; 0 turns blocking off).
        self.cpu_chunk: int | None = None

    def _trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The trunk's feature maps, its stem and first tapped stage run in chunks on CPU."""
        k = cpu_chunk_size(self, x)
        if not k or not isinstance(self.trunk, FeatureListNet) or self.trunk.grad_checkpointing:
            return self.trunk(x)
        # timm's FeatureListNet runs its children in order and keeps the tapped outputs; the
        # same loop here, with everything up to the first tapped stage (7x7 conv at 112 px,
        # max-pool, layer1 at 56 px) run in chunks.
        layers = list(self.trunk.items())
        n_early = next(i for i, (name, _) in enumerate(layers) if name in self.trunk.return_layers) + 1

        def early(z: torch.Tensor) -> torch.Tensor:
            for _, layer in layers[:n_early]:
                z = layer(z)
            return z

        x = run_blocked(early, x, k)
        feats = [x]
        for name, layer in layers[n_early:]:
            x = layer(x)
            if name in self.trunk.return_layers:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Input (B, 3, H, W) -> F_s (B, 512, ceil(H/32), ceil(W/32))."""
        feats = self._trunk(x)
        out = feats[-1]
        size = (int(out.shape[-2]), int(out.shape[-1]))
        for stage, proj in zip(self.skip_stages, self.skips):
            # Area pooling and a 1x1 conv commute, so pool first: same map, 16-64x fewer MACs.
            out = out + proj(resample_to(feats[stage - 1], size))
        if self.attention is not None:
            out = self.attention(out)
        return out
