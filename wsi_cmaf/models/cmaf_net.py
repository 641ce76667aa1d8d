"""CMAF-Net (Ativi et al., Sci Rep 2026): spatial CNN + contextual MobileViT, fused by CMAF."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from wsi_cmaf.errors import ModelError
from wsi_cmaf.models.bottleneck import VariationalBottleneck, gaussian_kl, normalized_hsic
from wsi_cmaf.models.cmaf_block import CMAFBlock
from wsi_cmaf.models.config import CMAFConfig
from wsi_cmaf.models.contextual import ContextualBranch
from wsi_cmaf.models.registry import register_model
from wsi_cmaf.models.spatial import SpatialBranch, resample_to

logger = logging.getLogger(__name__)


class CMAFNet(nn.Module):
    """Dual-branch classifier; every ablation of the paper's Table 6 is a :class:`CMAFConfig` switch.

    ``forward(x)`` returns logits and never materialises attention maps (fused SDPA).
    ``forward_with_aux(x)`` also returns the monitoring / regularisation dict (see module
    docs in MODEL.md for its keys). The network is fully convolutional up to global pooling and
    uses no size-bound parameters, so it runs at any input size >= 32 px.
    """

    def __init__(self, config: CMAFConfig | None = None, num_classes: int = 2) -> None:
        super().__init__()
        cfg = config or CMAFConfig()
        self.config = cfg
        self.num_classes = num_classes
        self.spatial = (
            SpatialBranch(cfg.spatial_backbone, cfg.spatial_skip_stages, cfg.spatial_attention,
                          cfg.spatial_attention_kernel)
            if cfg.use_spatial else None
        )
        self.contextual = (
            ContextualBranch(
                cfg.mvit_stem_channels, cfg.mvit_channels, cfg.mvit_dims, cfg.mvit_depths,
                cfg.patch_size, cfg.mvit_heads, cfg.mvit_mlp_ratio, cfg.mvit_expansion,
                cfg.mvit_unfold, cfg.nystrom_landmarks, cfg.nystrom_pinv_iters,
                cfg.scale_aware_pos, cfg.pos_scales, cfg.context_dim, cfg.attention,
                cfg.attention_exact_max_tokens,
                mixer="vssm" if cfg.context_branch == "vssm" else "attention",
                vssm_d_state=cfg.vssm_d_state, vssm_expand=cfg.vssm_expand,
            )
            if cfg.use_contextual else None
        )
        d_s = self.spatial.out_channels if self.spatial is not None else 0
        d_t = cfg.context_dim if self.contextual is not None else 0
        self.cmaf = (
            CMAFBlock(d_s, d_t, cfg.num_heads, cfg.tau_init, cfg.learn_temperature, cfg.gating,
                      cfg.reg_diversity, cfg.reg_entropy, cfg.reg_orthogonality, cfg.attn_dropout)
            if cfg.use_cmaf else None
        )
        self.vib_s = VariationalBottleneck(d_s, cfg.bottleneck_dim, cfg.logvar_clamp) if d_s else None
        self.vib_t = VariationalBottleneck(d_t, cfg.bottleneck_dim, cfg.logvar_clamp) if d_t else None
        fused_dim = cfg.context_dim if self.cmaf is not None else d_s + d_t
        # forward_features stacks [fused map | F_s | F_t] on channels: the head pools the fused map
        # and reads the VIBs' inputs from the branch maps, so the map alone determines the logits.
        self.map_channels = (fused_dim if self.cmaf is not None else 0, d_s, d_t)
        n_z = int(self.vib_s is not None) + int(self.vib_t is not None)
        # With DFA the logits get C per-class offsets from the class readout after the MLP.
        self.dfa_dims = num_classes if cfg.dfa and self.cmaf is not None else 0
        layers: list[nn.Module] = []
        width = fused_dim + n_z * cfg.bottleneck_dim
        for hidden in cfg.head_hidden:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = hidden
        self.num_features = width
        self.head_hidden_size = width
        self.head_hidden = nn.Sequential(*layers)
        self.head_drop = nn.Dropout(cfg.dropout)
        # a Module, not a Linear: multi-view fusion replaces it by nn.Identity (it uses pre-logits)
        self.fc: nn.Module = nn.Linear(width, num_classes)
        if self.dfa_dims and self.cmaf is not None:
            # Built after everything else so a DFA model and a DFA-off model with the same seed
            # start from identical weights everywhere else (paired ablations).
            self.cmaf.attach_dfa(num_classes, cfg.dfa_class_counts)

    # ------------------------------------------------------------------ features
    def forward_features(self, x: torch.Tensor, aux: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> feature map (B, sum(map_channels), H/32, W/32): [fused | F_s | F_t].

        Without the CMAF block the fused part is absent (the map is [F_s | F_t], or one branch).
        ``aux``, when given, receives the CMAF block's monitoring and regulariser terms.
        """
        f_s = self.spatial(x) if self.spatial is not None else None
        f_t = self.contextual(x) if self.contextual is not None else None
        if f_s is not None and f_t is not None:
            # Both branches reach stride 32, but rounding can differ for odd sizes: align F_t to F_s.
            f_t = resample_to(f_t, (int(f_s.shape[-2]), int(f_s.shape[-1])))
        maps = [self.cmaf(f_s, f_t, aux)] if self.cmaf is not None else []
        maps.extend(f for f in (f_s, f_t) if f is not None)
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)

    def _head_input(self, fmap: torch.Tensor,
                    aux: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feature map -> (MLP input (B, fused + z's), DFA logit offsets or None)."""
        if fmap.ndim != 4 or fmap.shape[1] != sum(self.map_channels):
            raise ModelError(f"CMAF-Net's head takes the (B, {sum(self.map_channels)}, h, w) map of "
                             f"forward_features, got shape {tuple(fmap.shape)}")
        fused, f_s, f_t = (part if part.shape[1] else None
                           for part in torch.split(fmap, list(self.map_channels), dim=1))
        pooled_s = f_s.mean(dim=(2, 3)) if f_s is not None else None
        pooled_t = f_t.mean(dim=(2, 3)) if f_t is not None else None
        parts: list[torch.Tensor] = []
        dfa_offsets = None
        if fused is not None:
            parts.append(fused.mean(dim=(2, 3)))
            if self.cmaf is not None and self.cmaf.dfa is not None:
                dfa_offsets = self.cmaf.dfa(fused.flatten(2).transpose(1, 2), self.cmaf.tau, aux)
        else:  # "simple concatenation" ablation and the single-branch ablations
            parts.extend(p for p in (pooled_s, pooled_t) if p is not None)
        zs: dict[str, torch.Tensor] = {}
        for tag, vib, pooled in (("s", self.vib_s, pooled_s), ("t", self.vib_t, pooled_t)):
            if vib is None or pooled is None:
                continue
            z, mu, logvar = vib(pooled)
            parts.append(z)
            zs[tag] = z
            if aux is not None:
                aux[f"z_{tag}"], aux[f"mu_{tag}"], aux[f"logvar_{tag}"] = z, mu, logvar
                aux[f"kl_{tag}"] = gaussian_kl(mu, logvar)
        if aux is not None and len(zs) == 2:
            aux["mi_st"] = normalized_hsic(zs["s"], zs["t"])
        return torch.cat(parts, dim=1), dfa_offsets

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     aux: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Feature map -> logits (B, C), or the pooled embedding (B, num_features) when ``pre_logits``.

        ``aux``, when given, receives the bottlenecks' and the DFA readout's terms.
        """
        feats, dfa_offsets = self._head_input(x, aux)
        h = self.head_hidden(feats)
        if pre_logits:
            return h
        logits = self.fc(self.head_drop(h))
        return logits if dfa_offsets is None else logits + dfa_offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits plus the aux dict for training (KL, regularisers, dependence) and monitoring."""
        aux: dict[str, torch.Tensor] = {}
        logits = self.forward_head(self.forward_features(x, aux), aux=aux)
        return logits, aux

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, branches={self.config.branches}, fusion={self.config.fusion}"


def build_cmaf_net(num_classes: int = 2, ablation: str | None = None, **overrides: Any) -> CMAFNet:
    """Build CMAF-Net from :class:`CMAFConfig` overrides, optionally starting from an ablation row."""
    cfg = CMAFConfig.for_ablation(ablation, **overrides) if ablation else CMAFConfig.from_dict(overrides)
    return CMAFNet(cfg, num_classes=num_classes)


@register_model("cmaf_net")
def cmaf_net(num_classes: int = 2, **overrides: Any) -> CMAFNet:
    """CMAF-Net as in the paper; ``ablation="cnn_only"`` etc. selects a Table 6 row."""
    return build_cmaf_net(num_classes=num_classes, **overrides)
