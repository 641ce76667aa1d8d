"""Nyström self-attention (Xiong et al., AAAI 2021), used inside the contextual branch.

Hand-written because timm has no Nyström attention; it is a drop-in replacement for
``timm.layers.Attention`` inside ``timm.models.vision_transformer.Block`` (same call signature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a batch of (row-stochastic) matrices by Newton-Schulz.

    This is the order-3 iteration of the Nyströmformer paper. It uses only matmuls (fast on GPU,
    traceable, AMP friendly when run in float32) and converges because the start value
    Z0 = Aᵀ / (‖A‖₁‖A‖∞) makes ‖I − A Z0‖ < 1. ``iters=0`` falls back to the exact SVD pinv.
    """
    a = a.float()
    if iters <= 0:
        return torch.linalg.pinv(a)
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    norm = a.abs().sum(dim=-1).amax(dim=-1) * a.abs().sum(dim=-2).amax(dim=-1)
    z = a.transpose(-1, -2) / norm[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_landmarks: int, pinv_iters: int = 6
) -> torch.Tensor:
    """Approximate softmax(q kᵀ/√d) v with ``num_landmarks`` segment-mean landmarks.

    q, k, v: (B, H, N, d). Cost O(N·m·d) instead of O(N²·d). Landmarks are means over contiguous
    token segments (adaptive pooling, so N need not be a multiple of m). When N <= m the exact
    attention is returned (through the fused SDPA kernel).
    """
    n, d = q.shape[-2], q.shape[-1]
    if n <= num_landmarks:
        return F.scaled_dot_product_attention(q, k, v)
    scale = d ** -0.5
    lead = q.shape[:-2]

    def landmarks(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, n, d).transpose(1, 2)  # (BH, d, N)
        return F.adaptive_avg_pool1d(flat, num_landmarks).transpose(1, 2).reshape(*lead, num_landmarks, d)

    q_l, k_l = landmarks(q), landmarks(k)
    kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2) * scale, dim=-1)  # (.., N, m)
    kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale, dim=-1)  # (.., m, m)
    kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2) * scale, dim=-1)  # (.., m, N)
    # The pseudo-inverse is ill-conditioned in half precision: do that part in float32.
    inv = iterative_pinv(kernel_2, pinv_iters)
    out = (kernel_1.float() @ inv) @ (kernel_3.float() @ v.float())
    return out.to(v.dtype)


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nyström approximation; timm ``Attention`` compatible."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        qkv_bias: bool = True,
        num_landmarks: int = 64,
        pinv_iters: int = 6,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_landmarks = num_landmarks
        self.pinv_iters = pinv_iters
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C). Masks are not supported (MobileViT never uses them)."""
        if attn_mask is not None or is_causal:
            raise NotImplementedError("NystromAttention does not support attention masks")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if n <= self.num_landmarks:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.0
            )
        else:
            out = nystrom_attention(q, k, v, self.num_landmarks, self.pinv_iters)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))
