"""A 2-D selective state-space block (VMamba-style SS2D) in plain PyTorch.

Why our own code: the reference implementations (``mamba-ssm``, VMamba's ``selective_scan``)
compile CUDA kernels at install time, which this project cannot require. The pure-PyTorch
package on PyPI we checked (``mambapy`` 1.2.0, last released July 2024) implements the 1-D
language-model Mamba with a parallel scan over power-of-two lengths and no 2-D cross-scan, so it
would still leave the vision part to us while adding a dependency; the scan below is ~40 lines.

Recurrence (Mamba's S6, per channel d and state n, zero-order-hold discretisation):

    h_t = exp(Δ_t · A) ⊙ h_{t-1} + Δ_t · B_t · u_t,        y_t = ⟨C_t, h_t⟩ + D · u_t

with input-dependent Δ (softplus), B and C, and A = −exp(A_log) < 0 so every step decays.
:func:`selective_scan` turns it into the linear recurrence ``h_t = a_t h_{t−1} + x_t`` per
(channel, state) and :func:`linear_scan` solves that without a Python loop over tokens: chunks of
4 steps in closed form, ``h_t = e^{c_t} Σ_{s≤t} e^{−c_s} x_s`` (c the running sum of log a), all
chunks at once, then the same function on the chunk-end states (4x shorter), ~log4(L) rounds of
element-wise ops, O(L) work. Per-step log-decays are floored at −16 (e^−16 ≈ 1.1e−7, fp32's
resolution of a unit state) so the chunk exponents stay within ±64, far from fp32 overflow; a
state that decays faster than that keeps ~1e−7 of itself, which is below rounding.
(A first version summed in log space with ``logcumsumexp``; its CPU kernel took 55 % of the
branch's time.)

SS2D (Liu et al., VMamba, 2024): the feature map is scanned in four orders — row-major,
column-major and both reversed — each with its own projections; the four outputs are mapped
back to the grid and summed, so every position sees context from every direction.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["linear_scan", "selective_scan", "cross_scan", "cross_merge", "SS2D", "VSSBlock"]

_DIRECTIONS = 4
#: Per-step log-decays below this are raised to it. exp(-16) = 1.1e-7 is fp32's resolution of a
#: unit state, so the change is below rounding; it bounds the exponents of the chunked form below.
_MIN_LOG_DECAY = -16.0
_LEVEL_CHUNK = 4  # 4 steps x 16 = e^64 at most inside a chunk, far from fp32's overflow at e^88


def linear_scan(log_a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = exp(log_a_t) · h_{t-1} + x_t along the last axis, h_{-1} = 0 (log_a <= 0).

    Chunks of 4 steps are solved in closed form, ``h_t = exp(c_t) · Σ_{s≤t} exp(−c_s) x_s`` with
    ``c`` the running sum of log_a inside the chunk (|c| <= 64, so nothing overflows), all chunks
    at once; the states carried from chunk to chunk obey the same recurrence with the chunks'
    total decays, which is solved by the same function on a 4x shorter sequence. So the work is
    O(L) in about log4(L) rounds of element-wise ops, with no Python loop over tokens.
    """
    length = x.shape[-1]
    t = _LEVEL_CHUNK
    if length <= 1:
        return x
    la = log_a.clamp_min(_MIN_LOG_DECAY)
    pad = (-length) % t
    if pad:
        la, x = F.pad(la, (0, pad)), F.pad(x, (0, pad))
    la = la.unflatten(-1, (-1, t))
    xc = x.unflatten(-1, (-1, t))
    cum = la.cumsum(-1)
    decay = cum.exp()  # >= e^-64: a normal fp32 number, so its reciprocal is exp(-cum) to rounding
    local = decay * (xc / decay).cumsum(-1)  # states inside each chunk from a zero start
    if local.shape[-2] > 1:
        ends = linear_scan(cum[..., -1], local[..., -1])  # state at each chunk's end
        carried = F.pad(ends[..., :-1], (1, 0))  # state entering each chunk
        local = local + decay * carried.unsqueeze(-1)
    return local.flatten(-2)[..., :length]


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """Selective scan over the last axis.

    Args:
        u, delta: (b, g, d, L) inputs and step sizes (Δ > 0) for g groups of d channels.
        A: (g, d, n) state matrix diagonal (negative for a decaying state).
        B, C: (b, g, n, L) input and output projections, shared by a group's channels.
        D: (g, d) skip, or None.
        chunk: steps per outer chunk (the state is carried between them); bounds the memory of
            the (b, g, d, n, chunk) intermediates, not the result.

    Returns:
        y (b, g, d, L), in u's dtype (the scan itself runs in fp32).
    """
    length = u.shape[-1]
    dtype = u.dtype
    # layout (b, g, d, n, L): the scan axis last and contiguous
    u32, dt, a = u.float().unsqueeze(3), delta.float().unsqueeze(3), A.float().unsqueeze(-1)
    bm, cm = B.float().unsqueeze(2), C.float()  # (b, g, 1, n, L), (b, g, n, L)
    h: torch.Tensor | None = None
    ys = []
    for s0 in range(0, length, max(1, chunk)):
        s1 = min(length, s0 + max(1, chunk))
        dt_c = dt[..., s0:s1]  # (b, g, d, 1, T)
        log_a = (dt_c * a).clamp_min(_MIN_LOG_DECAY)  # (b, g, d, n, T); the clamp as in linear_scan
        bu = (dt_c * u32[..., s0:s1]) * bm[..., s0:s1]  # (b, g, d, n, T)
        states = linear_scan(log_a, bu)
        if h is not None:
            states = states + log_a.cumsum(-1).exp() * h.unsqueeze(-1)
        ys.append(torch.einsum("bgdnt,bgnt->bgdt", states, cm[..., s0:s1]))
        h = states[..., -1]
    y = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
    if D is not None:
        y = y + D.float()[None, :, :, None] * u.float()
    return y.to(dtype)


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, d, H, W) -> (B, 4, d, H·W): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`cross_scan` summed over the directions: (B, 4, d, H·W) -> (B, d, H, W)."""
    b, _, d, _ = y.shape
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = (y[:, 1] + y[:, 3].flip(-1)).view(b, d, w, h).transpose(2, 3)
    return rows.view(b, d, h, w) + cols


class SS2D(nn.Module):
    """VMamba's 2-D selective scan: in-proj, depthwise conv, 4-direction S6, gated out-proj.

    Works on channels-last maps (B, H, W, C), as timm's MLPs and LayerNorms do.
    """

    def __init__(self, dim: int, d_state: int = 4, expand: float = 1.0, conv_kernel: int = 3,
                 dt_min: float = 1e-3, dt_max: float = 0.1, chunk: int = 1024) -> None:
        super().__init__()
        d_inner = int(round(expand * dim))
        self.d_inner, self.d_state, self.chunk = d_inner, d_state, chunk
        self.dt_rank = max(1, math.ceil(dim / 16))
        k = _DIRECTIONS
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, conv_kernel, padding=conv_kernel // 2, groups=d_inner)
        bound = d_inner ** -0.5  # nn.Linear's default init, one projection per direction
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        dt_bound = self.dt_rank ** -0.5
        self.dt_proj_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank).uniform_(-dt_bound, dt_bound))
        # Δ starts log-uniform in [dt_min, dt_max] (Mamba's init): bias = softplus⁻¹(Δ0)
        dt0 = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_proj_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))
        # S4D-real init: A = -(1, 2, ..., n) for every channel
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k, d_inner, 1))
        self.D = nn.Parameter(torch.ones(k, d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        xin, z = self.in_proj(x).chunk(2, dim=-1)
        xin = F.silu(self.conv(xin.permute(0, 3, 1, 2)))  # (B, d, H, W)
        xs = cross_scan(xin)  # (B, 4, d, L)
        proj = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dt, bmat, cmat = proj.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dt = torch.einsum("bkrl,kdr->bkdl", dt, self.dt_proj_weight) + self.dt_proj_bias[None, :, :, None]
        y = selective_scan(xs, F.softplus(dt), -torch.exp(self.A_log), bmat, cmat, self.D, self.chunk)
        y = cross_merge(y, h, w).permute(0, 2, 3, 1)  # (B, H, W, d)
        return self.out_proj(self.out_norm(y) * F.silu(z))


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + SS2D(LN(x)), then x + MLP(LN(x)); channels-last (B, H, W, C)."""

    def __init__(self, dim: int, d_state: int = 4, expand: float = 1.0, mlp_ratio: float = 2.0,
                 act_layer: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.ss2d = SS2D(dim, d_state, expand)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.ss2d(self.norm1(x))
        return x + self.mlp(self.norm2(x))
