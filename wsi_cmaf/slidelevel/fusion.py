"""Slide/patient classifiers: image-only MIL, clinical-only, concatenation, cross-attention fusion.

All four share one interface, so they are trained and evaluated with the same protocol::

    logit, aux = model(x, mask, clin, present)

``x``/``mask``: padded bags of tile embeddings (:func:`~wsi_cmaf.slidelevel.mil.pad_bags`);
``clin``: encoded clinical rows (:class:`~wsi_cmaf.slidelevel.clinical.ClinicalEncoder`);
``present``: bool per patient, whether clinical data exist. Binary outputs (one logit).

Cross-attention fusion: the MIL slide embedding ``z`` is the query; each clinical variable is one
token (its encoded columns, missing indicator included, through its own linear map, plus a learned
variable embedding) and supplies keys and values. ``fused = z + m * c`` where ``c`` is the attention
output and ``m`` the modality mask (``present``, and in training also kept with probability
1 - ``modality_dropout``). With ``m = 0`` the fused model *is* its image-only path
``head(z)``: exactly, not approximately (tested), which is also what modality dropout trains.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_cmaf.slidelevel.mil import GatedAttentionMIL

KINDS = ("fusion", "image", "clinical", "concat")


class ClinicalTokens(nn.Module):
    """Encoded clinical row (B, F) -> one token per variable (B, V, d)."""

    def __init__(self, groups: list[tuple[int, int]], dim: int) -> None:
        super().__init__()
        self.groups = [(int(a), int(b)) for a, b in groups]
        self.proj = nn.ModuleList([nn.Linear(b - a, dim) for a, b in self.groups])
        self.var_embedding = nn.Parameter(torch.randn(len(self.groups), dim) * 0.02)

    def forward(self, clin: torch.Tensor) -> torch.Tensor:
        tokens = [p(clin[:, a:b]) for p, (a, b) in zip(self.proj, self.groups)]
        return torch.stack(tokens, dim=1) + self.var_embedding


class SlideModel(nn.Module):
    """One of :data:`KINDS` (see module docstring); ``modality_dropout`` acts in training only, on the
    fusion and concatenation kinds (the models that also have an image)."""

    def __init__(self, kind: str, in_dim: int, clin_groups: list[tuple[int, int]] | None = None, *,
                 hidden: int = 64, attn_dim: int = 32, heads: int = 4, dropout: float = 0.1,
                 modality_dropout: float = 0.3) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind != "image" and not clin_groups:
            raise ValueError(f"a {kind!r} model needs clinical variables (clin_groups)")
        self.kind, self.in_dim, self.hidden = kind, int(in_dim), int(hidden)
        self.clin_groups = [(int(start), int(stop)) for start, stop in (clin_groups or [])]
        self.clin_width = self.clin_groups[-1][1] if self.clin_groups else 0
        self.modality_dropout = float(modality_dropout)
        self.dropout = float(dropout)
        self.mil = GatedAttentionMIL(in_dim, hidden, attn_dim, dropout) if kind != "clinical" else None
        if kind == "fusion":
            self.tokens = ClinicalTokens(self.clin_groups, hidden)
            self.cross = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        if kind == "clinical":
            self.clin_mlp = nn.Sequential(nn.Linear(self.clin_width, hidden), nn.ReLU(), nn.Dropout(dropout))
        head_in = hidden + (self.clin_width + 1 if kind == "concat" else 0)
        self.head = nn.Sequential(nn.Linear(head_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def modality_mask(self, present: torch.Tensor) -> torch.Tensor:
        """float (B,): 1 where clinical data are used; in training, dropped with ``modality_dropout``."""
        m = present.float()
        # not for the clinical-only baseline: hiding its only input would just be label noise
        if self.training and self.modality_dropout > 0 and self.kind != "clinical":
            keep = torch.rand(m.shape, device=m.device) >= self.modality_dropout
            m = m * keep.float()
        return m

    def image_only(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The image path alone: ``head(z)`` (fusion and image kinds)."""
        if self.mil is None or self.kind not in ("fusion", "image"):
            raise ValueError(f"a {self.kind!r} model has no image-only path")
        z, _ = self.mil(x, mask)
        return self.head(z).squeeze(-1)

    def forward(self, x: torch.Tensor | None, mask: torch.Tensor | None, clin: torch.Tensor | None = None,
                present: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B,) and aux: ``attention`` (B, N) tile weights, ``clinical_attention`` (B, V),
        ``modality`` (B,) the mask actually used."""
        aux: dict[str, torch.Tensor] = {}
        if x is not None:
            batch = x.shape[0]
        elif clin is not None:
            batch = clin.shape[0]
        else:
            raise ValueError("SlideModel.forward needs tile embeddings (x), clinical variables (clin) or both")
        if present is None:
            present = torch.zeros(batch, dtype=torch.bool) if clin is None else torch.ones(batch, dtype=torch.bool)
        if clin is None:
            clin = torch.zeros(batch, self.clin_width)
        m = self.modality_mask(present.to(clin.device)) if self.kind != "image" else torch.zeros(batch)
        aux["modality"] = m
        if self.kind == "clinical":
            return self.head(self.clin_mlp(clin) * m[:, None]).squeeze(-1), aux
        if self.mil is None or x is None or mask is None:
            raise ValueError(f"a {self.kind!r} model needs tile embeddings (x) and their mask")
        z, aux["attention"] = self.mil(x, mask)
        if self.kind == "image":
            h = z
        elif self.kind == "concat":
            h = torch.cat([z, clin * m[:, None], m[:, None]], dim=1)
        else:
            tokens = self.tokens(clin)
            c, weights = self.cross(z[:, None, :], tokens, tokens, need_weights=True)
            aux["clinical_attention"] = weights[:, 0]
            h = z + m[:, None] * c[:, 0]
        return self.head(h).squeeze(-1), aux

    def config(self) -> dict:
        """Constructor arguments (JSON-able) to rebuild the model around a saved state dict."""
        return {"kind": self.kind, "in_dim": self.in_dim, "clin_groups": [list(g) for g in self.clin_groups],
                "hidden": self.hidden, "attn_dim": self.mil.attn_v.out_features if self.mil is not None else 32,
                "heads": self.cross.num_heads if self.kind == "fusion" else 4,
                "dropout": self.dropout, "modality_dropout": self.modality_dropout}

    @classmethod
    def from_config(cls, cfg: dict) -> SlideModel:
        """Inverse of :meth:`config`."""
        cfg = dict(cfg)
        return cls(cfg.pop("kind"), cfg.pop("in_dim"), [tuple(g) for g in cfg.pop("clin_groups")], **cfg)
