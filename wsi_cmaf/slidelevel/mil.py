"""Gated attention-MIL pooling (Ilse, Tomczak & Welling, ICML 2018) over a bag of tile embeddings.

For tile embeddings h_k (after a shared linear+ReLU layer) the attention score is
``w^T (tanh(V h_k) * sigmoid(U h_k))``; the weights are the softmax of the scores over the bag's
real tiles (padding masked out, weight exactly 0) and the slide embedding is ``sum_k a_k h_k``.
Bags of different sizes are padded into one batch by :func:`pad_bags`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def pad_bags(bags: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags (N_i, D) into ``x`` float32 (B, max N, D) zero-padded and ``mask`` bool (B, max N)."""
    if not bags:
        raise ValueError("pad_bags needs at least one bag")
    dim = int(bags[0].shape[1])
    n_max = max(max(int(b.shape[0]) for b in bags), 1)
    x = torch.zeros(len(bags), n_max, dim)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, b in enumerate(bags):
        t = torch.as_tensor(np.asarray(b, dtype=np.float32)) if not isinstance(b, torch.Tensor) else b.float()
        if t.ndim != 2 or t.shape[1] != dim:
            raise ValueError(f"bag {i} has shape {tuple(t.shape)}; every bag must be (N, {dim})")
        x[i, : len(t)] = t
        mask[i, : len(t)] = True
    return x, mask


class GatedAttentionMIL(nn.Module):
    """Bag (B, N, D) + mask -> slide embedding (B, hidden) and attention (B, N).

    ``feature_mean``/``feature_std`` buffers standardise the tile embeddings (set them from the
    training tiles with :meth:`set_standardisation`; identity by default).
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, in_dim: int, hidden: int = 64, attn_dim: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim, self.hidden = int(in_dim), int(hidden)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attn_dim)
        self.attn_u = nn.Linear(hidden, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)

    def set_standardisation(self, tiles: np.ndarray) -> None:
        """Standardise inputs with the mean/std of ``tiles`` (N, D), the training patients' tiles."""
        t = torch.as_tensor(np.asarray(tiles, dtype=np.float32))
        std = t.std(dim=0, unbiased=False)
        self.feature_mean.copy_(t.mean(dim=0))
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, N, D), ``mask`` bool (B, N) -> (slide embedding (B, hidden), attention (B, N))."""
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every bag needs at least one tile (a slide without embeddings cannot be pooled)")
        h = self.embed((x - self.feature_mean) / self.feature_std)
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)  # exp(-inf) = 0: padding gets weight 0 exactly
        return torch.einsum("bn,bnh->bh", attn, h), attn
