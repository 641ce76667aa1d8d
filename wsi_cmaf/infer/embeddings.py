"""Tile embeddings computed in the same forward pass as the probabilities.

With ``InferenceConfig(embeddings=True)`` the engine runs a wrapper around the model that returns
``[logits | embedding]`` in one tensor: the embedding is ``forward_head(forward_features(x),
pre_logits=True)``, the vector the model's final classifier layer reads, and the logits come from
the same feature map in the same pass. Everything downstream of the model (padding, the CUDA
output ring, the writer thread) sees one wider output row per tile and splits it when writing;
nothing is read twice.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from wsi_cmaf.errors import ModelError

if TYPE_CHECKING:  # the models package imports every architecture; only its type is needed here
    from wsi_cmaf.models.registry import SplitModel

logger = logging.getLogger(__name__)


class EmbeddingsUnavailableError(ModelError):
    """The model cannot give tile embeddings (it has no ``forward_features``/``forward_head``)."""


class WithEmbeddings(nn.Module):
    """``x -> cat([logits, embedding], dim=1)`` from one ``forward_features`` map, with
    ``logits = forward_head(map)`` and ``embedding = forward_head(map, pre_logits=True)``
    (timm's contract, which the registry models and encoders follow)."""

    def __init__(self, model: nn.Module, tasks: list[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks or [])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        # *inputs: a tile batch, or (views, missing) for a multi-view model
        model = cast("SplitModel", self.model)  # embeddings_model refuses models without the split
        feats = model.forward_features(*inputs)
        logits = model.forward_head(feats)
        if isinstance(logits, dict):  # a multi-task model: every task's logits, in task order
            logits = torch.cat([logits[t] for t in (self.tasks or list(logits))], dim=1)
        embedding = model.forward_head(feats, pre_logits=True)
        return torch.cat([logits, embedding.to(logits.dtype)], dim=1)


_WRAPPED: weakref.WeakKeyDictionary[nn.Module, tuple[WithEmbeddings, int]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def with_embeddings(model: nn.Module, input_size: int, name: str = "model", *,
                    tasks: dict[str, list[str]] | None = None, views=None) -> tuple[WithEmbeddings, int]:
    """The embedding wrapper of ``model`` and the embedding width D (checked on one tiny input).

    ``tasks`` ({task: class names}) orders a multi-task model's logits; ``views`` (a multi-view
    model's :class:`~wsi_cmaf.slide.views.ViewSpec` list) shapes the check input.

    Cached per model, so a batch worker prepares (and compiles) the wrapper once for many slides.
    Raises :class:`EmbeddingsUnavailableError` for models without ``forward_features`` and
    ``forward_head`` (e.g. TorchScript files, which keep only ``forward``).
    """
    with _LOCK:
        hit = _WRAPPED.get(model)
    if hit is not None:
        return hit
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        kind = "a TorchScript module" if isinstance(model, torch.jit.ScriptModule) else type(model).__name__
        raise EmbeddingsUnavailableError(
            f"{name} ({kind}) has no forward_features/forward_head, so its tile embeddings cannot be "
            "taken; embeddings need a registry model (cmaf_net, timm:<name>) or weights saved from one "
            "— run without embeddings, or load the model from its weights directory")
    from wsi_cmaf.preprocess import sample_input

    wrapper = WithEmbeddings(model, list(tasks or [])).eval()
    x = sample_input(views, int(input_size))
    try:
        with torch.inference_mode():
            out = wrapper(*x)
            split = cast("SplitModel", model)
            n_classes = (sum(len(c) for c in tasks.values()) if tasks
                         else split.forward_head(split.forward_features(*x)).shape[1])
    except Exception as exc:  # a user's module: report it as a model problem, before any slide work
        raise EmbeddingsUnavailableError(f"{name}: taking embeddings failed on a 1x3x{input_size}x{input_size} "
                                         f"input: {type(exc).__name__}: {exc}") from exc
    dim = int(out.shape[1] - n_classes)
    if out.ndim != 2 or dim < 1:
        raise EmbeddingsUnavailableError(f"{name}: forward_head(pre_logits=True) gives no embedding vector "
                                         f"(output {tuple(out.shape)})")
    logger.info("tile embeddings: %d features per tile from %s", dim, name)
    with _LOCK:
        _WRAPPED[model] = (wrapper, dim)
    return wrapper, dim
