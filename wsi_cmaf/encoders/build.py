"""Building an encoder from its registry entry: the timm trunk and the embedding it forms.

:class:`EncoderModule` is what the inference engine runs. Its ``forward_features`` is the trunk's
token map, ``forward_head(..., pre_logits=True)`` the tile embedding (B, D) and ``forward_head``
a single constant logit per tile, so the engine's
embedding path (``InferenceConfig(embeddings=True)``) stores the embeddings and its heatmap is a
coverage map (1 where a tile was embedded, NaN elsewhere) rather than a class probability.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, SupportsIndex, cast

import torch
from torch import nn

from wsi_cmaf.encoders.registry import EncoderSpec, timm_kwargs
from wsi_cmaf.errors import EncoderDimensionError, EncoderError

if TYPE_CHECKING:  # the models package imports every architecture; only its type is needed here
    from wsi_cmaf.models.registry import SplitModel

logger = logging.getLogger(__name__)

#: the single "class" of an encoder store's main image
COVERAGE_CLASS = "embedded"


class EncoderModule(nn.Module):
    """A timm ViT trunk plus the registry's embedding formation.

    ``cls``: the class token of the final normalised tokens; ``cls+mean_patch``: the class token
    concatenated with the mean of the patch tokens (register tokens excluded), as Virchow does;
    ``timm``: timm's own pooled pre-logits output.
    """

    def __init__(self, trunk: nn.Module, pooling: str, name: str = "encoder") -> None:
        super().__init__()
        self.trunk = trunk
        self.pooling = pooling
        self.encoder_name = name
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))
        width = int(getattr(trunk, "num_features", 0) or getattr(trunk, "embed_dim", 0))
        if pooling == "timm":
            width = int(getattr(trunk, "head_hidden_size", 0) or width)
        #: the embedding width D (0 when the trunk does not say; the loader then probes it)
        self.num_features = 2 * width if pooling == "cls+mean_patch" else width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's feature map: final normalised tokens (B, N, C) for a ViT."""
        return cast("SplitModel", self.trunk).forward_features(x)  # timm trunks have the split

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The (B, D) tile embedding with ``pre_logits``; else one logit per tile that is 0
        (softmax: 1.0) when its embedding is finite and NaN when it is not, so a NaN/Inf embedding
        shows as a hole in the coverage map and in the engine's non-finite checks instead of
        passing as covered."""
        if self.pooling == "timm" or x.ndim != 3:
            emb = cast("SplitModel", self.trunk).forward_head(x, pre_logits=True)
        elif self.pooling == "cls":
            emb = x[:, 0]
        else:
            emb = torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)
        if pre_logits:
            return emb
        return (emb.float() * 0).sum(dim=1, keepdim=True)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tiles (B, 3, H, W) -> embeddings (B, D)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tiles -> the coverage logit (B, 1)."""
        return self.forward_head(self.forward_features(x))

    #: (function, arguments) that rebuild this module from its checkpoint file; set by the
    #: loader when the weights came from a file
    rebuild_from: tuple[Callable[..., nn.Module], tuple] | None = None

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        # A batch hands its model to every worker as a pickle; an encoder whose weights are a
        # file travels as that file's path and hash (bytes, not gigabytes) and each worker reads
        # the checkpoint itself, checking the hash.
        if self.rebuild_from is not None:
            return self.rebuild_from
        return super().__reduce_ex__(protocol)


def build_trunk(spec: EncoderSpec, device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """The timm trunk of ``spec`` with random weights, never fetching any (``pretrained=False``).

    On ``device="meta"`` no memory is allocated: parameter counts and shapes without weights.
    """
    import timm

    kwargs = timm_kwargs(spec, **overrides)
    try:
        with torch.device(device):
            trunk = timm.create_model(spec.timm_arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EncoderError(f"encoder {spec.name}: timm could not build {spec.timm_arch} with {spec.timm_kwargs}: "
                           f"{exc}") from exc
    return trunk.eval()


def build_encoder(spec: EncoderSpec, device: str | torch.device = "cpu", **overrides: Any) -> EncoderModule:
    """:class:`EncoderModule` of ``spec`` with random weights (load real ones with the loader)."""
    return EncoderModule(build_trunk(spec, device, **overrides), spec.pooling, spec.name).eval()


def embedding_dim(module: EncoderModule, spec: EncoderSpec) -> int:
    """The embedding width ``module`` gives (from the trunk's width, no forward pass).

    Raises :class:`EncoderDimensionError` when a registered entry declares another width.
    """
    dim = module.num_features
    if spec.dim and dim != spec.dim:
        raise EncoderDimensionError(f"encoder {spec.name}: the {spec.timm_arch} trunk gives {dim}-wide embeddings "
                                    f"but the registry declares {spec.dim}; the entry or its timm_kwargs are wrong")
    return dim


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (works on meta tensors)."""
    return int(sum(p.numel() for p in module.parameters()))
