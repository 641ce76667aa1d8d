"""Contextual branch of CMAF-Net (paper Sec. 4.2): MobileViT with the paper's three changes.

1. *Patch size 8 instead of ViT's 16*: the first transformer stage works on a token grid of
   stride ``patch_size`` input pixels (each token describes an 8x8 pixel patch at 224 px input).
2. *Scale-aware positional embedding*: fixed 2-D sin-cos position codes plus a learned projection
   of the input's Sobel gradient magnitude at several scales, pooled to the token grid.
3. *Nyström self-attention* (``nystrom.py``) replaces exact attention inside the transformers.

Building blocks come from timm (``InvertedResidual``, ``ConvNormAct``, ViT ``Block``); only the
MobileViT block's forward is written here because the positional embedding needs the gradient map.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models.vision_transformer import Block as TransformerBlock
from torch import nn

from wsi_cmaf.models.blocking import cpu_chunk_size, run_blocked
from wsi_cmaf.models.nystrom import NystromAttention

#: Global mixers a ContextualBlock can use: MobileViT's transformer, or VMamba's SS2D (vssm.py).
MIXERS = ("attention", "vssm")

logger = logging.getLogger(__name__)


def _sincos_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * omega  # (h, q)
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * omega  # (w, q)
    y_code = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)
    x_code = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)
    code = torch.cat([y_code, x_code], dim=-1)
    if code.shape[-1] < dim:  # dims not divisible by 4: pad with zeros
        code = F.pad(code, (0, dim - code.shape[-1]))
    return code.permute(2, 0, 1).to(dtype)


_SINCOS_CACHE: dict[tuple[int, int, int, torch.device, torch.dtype, int], torch.Tensor] = {}
_SINCOS_CACHE_MAX = 64


def _stream_key(device: torch.device) -> int:
    """The CUDA stream a tensor built now is ordered on (0 off CUDA, where there are no streams)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def sincos_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2-D sine-cosine position code (dim, h, w) for any grid (no size-bound parameters).

    Input-independent, so it is built once per (h, w, dim, device, dtype) and reused: eager
    forwards otherwise spend ~10 small kernels per MobileViT block on it. Under ``torch.compile``
    it is computed in the graph (Inductor folds it into a constant).

    On CUDA each stream gets its own copy: slides in flight run on their own streams, and a
    code built on one stream may not be finished when another stream reads it. Per stream, the
    caching allocator also makes dropping entries safe: a freed block is reused on the stream
    it was allocated on only, after the kernels already queued there (the ones reading it).
    """
    if torch.compiler.is_compiling():
        return _sincos_2d(h, w, dim, device, dtype)
    device = torch.device(device)
    key = (h, w, dim, device, dtype, _stream_key(device))
    code = _SINCOS_CACHE.get(key)
    if code is None:
        if len(_SINCOS_CACHE) >= _SINCOS_CACHE_MAX:
            _SINCOS_CACHE.clear()
        # A normal tensor even when first built under inference_mode, so later training
        # forwards may use it too.
        with torch.inference_mode(False):
            code = _sincos_2d(h, w, dim, device, dtype)
        _SINCOS_CACHE[key] = code
    return code


class GradientPyramid(nn.Module):
    """Sobel gradient magnitude of the grey image at several scales (fixed filters, no weights)."""

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    kernel: torch.Tensor
    grey: torch.Tensor

    def __init__(self, scales: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        self.scales = tuple(scales)
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
        kernel = torch.stack([sobel_x, sobel_x.t()])[:, None]  # (2, 1, 3, 3)
        # Non-persistent: constants, not weights, so they stay out of the safetensors file.
        self.register_buffer("kernel", kernel, persistent=False)
        self.register_buffer("grey", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> one (B, 1, H/s, W/s) magnitude map per scale s."""
        grey = (x * self.grey.to(x.dtype)).sum(dim=1, keepdim=True)
        maps = []
        for s in self.scales:
            g = F.avg_pool2d(grey, s, ceil_mode=True) if s > 1 else grey
            g = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), self.kernel.to(g.dtype))
            maps.append(torch.sqrt(g.pow(2).sum(dim=1, keepdim=True) + 1e-6))
        return maps

    @staticmethod
    def to_grid(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Mean magnitude inside each token's footprint, log-compressed: (B, n_scales, h, w)."""
        return torch.log1p(torch.cat([F.adaptive_avg_pool2d(m, size) for m in maps], dim=1))


def _unfold(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) with H, W multiples of p -> (B*p*p, N, C): same-offset pixels form a sequence.

    One copy (the final reshape); splitting H and W is a view in either memory format.
    """
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 3, 5, 2, 4, 1)
    return x.reshape(b * p * p, (h // p) * (w // p), c)


def _fold(x: torch.Tensor, b: int, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of :func:`_unfold`, returned as a channels_last (B, C, H, W) view.

    One copy into (B, H, W, C) order: the channel axis is already last in the token layout, so a
    channels_last result costs nothing more, and the 1x1 conv that follows reads it directly.
    """
    c = x.shape[-1]
    x = x.reshape(b, p, p, h // p, w // p, c).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, h, w, c).permute(0, 3, 1, 2)


class ContextualBlock(nn.Module):
    """MobileViT block (local conv -> unfold -> transformer -> fold -> fuse) with our changes."""

    def __init__(
        self,
        channels: int,
        dim: int,
        depth: int,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        unfold: int = 2,
        num_landmarks: int = 64,
        pinv_iters: int = 6,
        n_grad_scales: int = 3,
        scale_aware_pos: bool = True,
        attention: str = "nystrom",
        exact_max_tokens: int = 0,
        mixer: str = "attention",
        vssm_d_state: int = 4,
        vssm_expand: float = 1.0,
    ) -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        self.unfold = unfold
        self.mixer = mixer
        self.conv_kxk = ConvNormAct(channels, channels, 3, act_layer=nn.SiLU)
        self.conv_1x1 = nn.Conv2d(channels, dim, 1, bias=False)
        self.grad_proj = nn.Conv2d(n_grad_scales, dim, 1) if scale_aware_pos else None
        blocks: list[nn.Module] = []
        for _ in range(depth):
            if mixer == "vssm":
                from wsi_cmaf.models.vssm import VSSBlock  # only models that use it pay the import

                blocks.append(VSSBlock(dim, vssm_d_state, vssm_expand, mlp_ratio, act_layer=nn.SiLU))
                continue
            blk = TransformerBlock(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                   act_layer=nn.SiLU)
            blk.attn = NystromAttention(dim, num_heads, qkv_bias=True, num_landmarks=num_landmarks,
                                        pinv_iters=pinv_iters, mode=attention,
                                        exact_max_tokens=exact_max_tokens)
            blocks.append(blk)
        self.transformer = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim)
        self.conv_proj = ConvNormAct(dim, channels, 1, act_layer=nn.SiLU)
        self.conv_fusion = ConvNormAct(2 * channels, channels, 3, act_layer=nn.SiLU)

    def forward(
        self,
        x: torch.Tensor,
        grads: list[torch.Tensor] | None = None,
        grid_cache: dict[tuple[int, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w); ``grads`` is the :class:`GradientPyramid` output.

        ``grid_cache`` shares :meth:`GradientPyramid.to_grid` results between the blocks of one
        forward pass (keyed by grid size).
        """
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        b, dim, h, w = x.shape
        x = x + sincos_2d(h, w, dim, x.device, x.dtype)
        if self.grad_proj is not None and grads is not None:
            grid = grid_cache.get((h, w)) if grid_cache is not None else None
            if grid is None:
                grid = GradientPyramid.to_grid(grads, (h, w))
                if grid_cache is not None:
                    grid_cache[(h, w)] = grid
            x = x + self.grad_proj(grid.to(x.dtype))
        if self.mixer == "vssm":
            # The 4-direction scans already give every position the whole grid as context, so no
            # unfold: VSS blocks run on the channels-last map itself.
            x = self.norm(self.transformer(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            return self.conv_fusion(torch.cat([shortcut, self.conv_proj(x)], dim=1))
        p = self.unfold
        ph, pw = math.ceil(h / p) * p, math.ceil(w / p) * p
        if (ph, pw) != (h, w):  # as timm's MobileViT: resample rather than pad (no masks needed)
            x = F.interpolate(x, size=(ph, pw), mode="bilinear", align_corners=False)
        x = self.norm(self.transformer(_unfold(x, p)))
        x = _fold(x, b, ph, pw, p)
        if (ph, pw) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return self.conv_fusion(torch.cat([shortcut, self.conv_proj(x)], dim=1))


class ContextualBranch(nn.Module):
    """MobileViT-style network -> F_t (B, context_dim, H/32, W/32).

    Layout by output stride: stem conv + IR (2), then at strides 4, 8, 16, 32 a strided inverted
    residual followed by a :class:`ContextualBlock` once the stride reaches ``patch_size`` (MV2
    blocks before that, as in MobileViT). A final 1x1 conv lifts the last stage to D_t.
    """

    def __init__(
        self,
        stem_channels: int = 16,
        channels: tuple[int, ...] = (32, 48, 64, 64, 64),
        dims: tuple[int, ...] = (64, 64, 64),
        depths: tuple[int, ...] = (2, 2, 2),
        patch_size: int = 8,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        expansion: float = 4.0,
        unfold: int = 2,
        num_landmarks: int = 64,
        pinv_iters: int = 6,
        scale_aware_pos: bool = True,
        pos_scales: tuple[int, ...] = (1, 2, 4),
        out_dim: int = 480,
        attention: str = "nystrom",
        exact_max_tokens: int = 0,
        mixer: str = "attention",
        vssm_d_state: int = 4,
        vssm_expand: float = 1.0,
    ) -> None:
        super().__init__()
        act = nn.SiLU
        self.grads = GradientPyramid(pos_scales) if scale_aware_pos else None
        self.stem = nn.Sequential(
            ConvNormAct(3, stem_channels, 3, stride=2, act_layer=act),
            InvertedResidual(stem_channels, channels[0], exp_ratio=expansion, act_layer=act),
        )
        first_tr = int(round(math.log2(patch_size)))
        self.down = nn.ModuleList()
        self.bodies = nn.ModuleList()
        t = 0
        for stride_log in range(2, 6):  # output strides 4, 8, 16, 32
            c_in, c_out = channels[stride_log - 2], channels[stride_log - 1]
            self.down.append(InvertedResidual(c_in, c_out, stride=2, exp_ratio=expansion, act_layer=act))
            if stride_log >= first_tr:
                self.bodies.append(ContextualBlock(
                    c_out, dims[t], depths[t], num_heads, mlp_ratio, unfold, num_landmarks,
                    pinv_iters, len(pos_scales), scale_aware_pos, attention, exact_max_tokens,
                    mixer, vssm_d_state, vssm_expand))
                t += 1
            else:  # MobileViT: 2 extra MV2 blocks at stride 4, one at the other strides
                n_ir = 2 if stride_log == 2 else 1
                self.bodies.append(nn.Sequential(*[
                    InvertedResidual(c_out, c_out, exp_ratio=expansion, act_layer=act) for _ in range(n_ir)
                ]))
        self.out_channels = out_dim
        self.final = ConvNormAct(channels[-1], out_dim, 1, act_layer=act)
        #: index of the first stage whose body is a transformer; the stages before it (and its
        #: down-sampling) are convolution-only
        self.first_contextual = next(
            (i for i, body in enumerate(self.bodies) if isinstance(body, ContextualBlock)), len(self.bodies))
        #: Images per chunk for the local stages on CPU in eval mode: None picks from the thread
        #: count and input size, 0 turns blocking off (``blocking.cpu_chunk_size``).
        self.cpu_chunk: int | None = None

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution-only stages before the first transformer (stem, MV2 stages, its down)."""
        x = self.stem(x)
        for i, (down, body) in enumerate(zip(self.down, self.bodies)):
            x = down(x)
            if i == self.first_contextual:
                break
            x = body(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Input (B, 3, H, W) -> F_t (B, D_t, ~H/32, ~W/32)."""
        grads = self.grads(x) if self.grads is not None else None
        grid_cache: dict[tuple[int, int], torch.Tensor] = {}
        # The local stages are memory-bound at this resolution; blocking the later stages or the
        # gradient maps as well measured no faster.
        x = run_blocked(self._local, x, cpu_chunk_size(self, x))
        first = self.first_contextual
        for i in range(first, len(self.bodies)):
            if i > first:
                x = self.down[i](x)
            x = self.bodies[i](x, grads, grid_cache)
        return self.final(x)
