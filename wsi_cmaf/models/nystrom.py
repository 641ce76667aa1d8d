"""Nyström self-attention (Xiong et al., AAAI 2021), used inside the contextual branch.

Hand-written because timm has no Nyström attention; it is a drop-in replacement for
``timm.layers.Attention`` inside ``timm.models.vision_transformer.Block`` (same call signature).

Precision: under autocast the landmark kernels and the two large products run in the autocast
dtype (bf16/fp16); only the Newton-Schulz pseudo-inverse and the small m x d product it feeds run
in fp32, because the pseudo-inverse of a near-singular softmax matrix has large entries of both
signs that cancel, which half precision cannot represent.

``attention="auto"`` picks exact fused attention (``F.scaled_dot_product_attention``) for
sequences of at most ``exact_max_tokens`` tokens: at such lengths exact attention costs fewer
multiply-adds than the m x m pseudo-inverse alone (see :func:`attention_macs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Attention modes of the contextual branch ("nystrom" is the paper's choice).
ATTENTION_MODES = ("nystrom", "exact", "auto")


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a batch of (row-stochastic) matrices by Newton-Schulz.

    This is the order-3 iteration of the Nyströmformer paper,
    Z <- 1/4 Z (13 I - AZ (15 I - AZ (7 I - AZ))), always in float32 (autocast is switched off
    here). It uses only batched matmuls; the scaled identities are built once per call and each
    "c I - P Q" is one fused ``baddbmm``. It converges because the start value
    Z0 = Aᵀ / (‖A‖₁‖A‖∞) makes ‖I − A Z0‖ < 1. ``iters=0`` falls back to the exact SVD pinv.
    """
    with torch.autocast(a.device.type, enabled=False):
        a = a.float()
        if iters <= 0:
            return torch.linalg.pinv(a)
        lead, m = a.shape[:-2], a.shape[-1]
        a3 = a.reshape(-1, m, m)
        eye = torch.eye(m, device=a.device, dtype=a.dtype)
        eye7, eye15, eye13 = eye * 7.0, eye * 15.0, eye * 3.25  # 13/4: the 1/4 is folded in
        absa = a3.abs()
        norm = absa.sum(dim=-1).amax(dim=-1) * absa.sum(dim=-2).amax(dim=-1)
        z = a3.transpose(-1, -2) / norm[:, None, None]
        for _ in range(iters):
            az = torch.bmm(a3, z)
            t = torch.baddbmm(eye15, az, eye7 - az, alpha=-1.0)  # 15I - AZ(7I - AZ)
            t = torch.baddbmm(eye13, az, t, alpha=-0.25)  # (13I - AZ t) / 4
            z = torch.bmm(z, t)
        return z.reshape(*lead, m, m)


def attention_macs(n: int, d: int, num_landmarks: int, pinv_iters: int = 6) -> tuple[int, int]:
    """Multiply-adds per head of (exact, Nyström) attention over ``n`` tokens of width ``d``."""
    m = num_landmarks
    exact = 2 * n * n * d
    nystrom = 4 * n * m * d + 2 * m * m * d + pinv_iters * 4 * m**3
    return exact, nystrom


def nystrom_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_landmarks: int, pinv_iters: int = 6
) -> torch.Tensor:
    """Approximate softmax(q kᵀ/√d) v with ``num_landmarks`` segment-mean landmarks.

    q, k, v: (B, H, N, d). Cost O(N·m·d + m³) instead of O(N²·d). Landmarks are means over
    contiguous token segments (adaptive pooling, so N need not be a multiple of m). When N <= m
    the exact attention is returned (through the fused SDPA kernel).
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
    kv = kernel_3.to(v.dtype) @ v  # (.., m, d): row-stochastic weights, safe in half precision
    inv = iterative_pinv(kernel_2, pinv_iters)
    with torch.autocast(q.device.type, enabled=False):
        # inv has large entries of both signs: contract it with kv in fp32. Associating as
        # k1 (inv (k3 v)) instead of (k1 inv)(k3 v) is the same product with m²d instead of Nm²
        # multiply-adds for the middle factor.
        w = (inv @ kv.float()).to(v.dtype)  # (.., m, d)
    return kernel_1.to(v.dtype) @ w


def use_exact(mode: str, n: int, num_landmarks: int, exact_max_tokens: int) -> bool:
    """Whether a sequence of ``n`` tokens uses exact attention under ``mode``."""
    if mode == "exact" or n <= num_landmarks:
        return True
    return mode == "auto" and n <= exact_max_tokens


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nyström approximation; timm ``Attention`` compatible.

    ``mode`` selects Nyström (the paper), exact fused attention, or "auto" (exact up to
    ``exact_max_tokens`` tokens, Nyström beyond). The weights are the same in every mode.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        qkv_bias: bool = True,
        num_landmarks: int = 64,
        pinv_iters: int = 6,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mode: str = "nystrom",
        exact_max_tokens: int = 0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_landmarks = num_landmarks
        self.pinv_iters = pinv_iters
        self.mode = mode
        self.exact_max_tokens = exact_max_tokens
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
        if use_exact(self.mode, n, self.num_landmarks, self.exact_max_tokens):
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.0
            )
        else:
            out = nystrom_attention(q, k, v, self.num_landmarks, self.pinv_iters)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, num_landmarks={self.num_landmarks}, exact_max_tokens={self.exact_max_tokens}"
