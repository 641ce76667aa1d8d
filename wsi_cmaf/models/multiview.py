"""Gated multi-view fusion over magnifications of one tile.

A shared backbone (CMAF-Net or any registry / timm model) embeds each view of a tile — e.g. the
tile at 4 µm/px and its context at 16 µm/px (:mod:`wsi_cmaf.slide.views`) — and gated attention
(Ilse et al. 2018: ``a_v ∝ exp(wᵀ(tanh(V e_v) ⊙ σ(U e_v)))``) fuses the V embeddings into one.

* **Missing views** (context that runs off the slide) get logit ``-inf`` before the softmax, so
  their weight is exactly 0; the backbone never sees their pixels (only present views are
  embedded), so garbage in a missing view cannot reach the output, not even through BatchNorm's
  batch statistics in training mode.
* **View dropout** (training mode only): each view other than view 0 is dropped with
  probability ``view_dropout``. View 0 is the tile itself at the model's magnification: it is
  always present at inference (:mod:`wsi_cmaf.slide.views` never marks the tile's own view
  missing), so training without it would teach a case that never occurs; ``drop_anchor=True``
  allows it anyway. At least one present view always survives.
* **All views missing**: ``all_missing="error"`` raises :class:`ModelError`; ``"zeros"`` fuses
  to a zero embedding, so the head outputs its bias (a named, documented fallback).
* **Tasks**: ``tasks={"malignancy": 2, "subtype": 8}`` adds heads (:mod:`.heads`); with more than
  one task ``forward`` returns ``{task: logits}``, with one task a plain ``(B, C)`` tensor.
  ``num_views=1`` makes a single-view multi-task model (registered as ``"multitask"``).
  ``task_class_names`` records each task's class names in the saved config
  (:func:`wsi_cmaf.models.heads.saved_task_classes` reads them back).
* **Views on slides**: ``views=[{"mpp": 4, "size": 50}, {"mpp": 16, "size": 50}]`` (saved in
  ``model_kwargs.views``, one entry per view, view 0 = the tile at the config's
  ``spacing_um_px`` / ``patch_size_pixels``) tells ``analyze_slide`` what to cut around each
  tile (:mod:`wsi_cmaf.infer.multiview`); a model with several views needs it there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from wsi_cmaf.config_dict import from_dict
from wsi_cmaf.errors import ModelConfigError, ModelError
from wsi_cmaf.models.cmaf_net import CMAFNet
from wsi_cmaf.models.heads import TaskHeads, check_tasks
from wsi_cmaf.models.registry import SplitModel, create_model, register_model

logger = logging.getLogger(__name__)

__all__ = ["MultiViewConfig", "MultiViewNet", "GatedViewAttention", "ViewBatch"]

_ALL_MISSING = ("error", "zeros")


@dataclass
class ViewBatch:
    """A batch of tiles with their views and missing-view mask, as one model input.

    The training loop, its batch pipeline and ``predict`` pass this where single-view models get a
    tensor, so the mask travels with the pixels through micro-batching, SAM's second pass and
    evaluation. ``views[v]`` is (B, 3, H_v, W_v); ``missing`` is (B, V) bool (True = missing).
    """

    views: list[torch.Tensor]
    missing: torch.Tensor

    def __len__(self) -> int:
        return int(self.missing.shape[0])

    @property
    def anchor(self) -> torch.Tensor:
        """View 0: the tile itself at the model's magnification (never missing)."""
        return self.views[0]

    def to(self, *args: Any, **kwargs: Any) -> ViewBatch:
        """``Tensor.to`` on every view; the mask only moves device (it stays bool)."""
        views = [v.to(*args, **kwargs) for v in self.views]
        return ViewBatch(views, self.missing.to(device=views[0].device, non_blocking=kwargs.get("non_blocking", False)))

    def tensor_split(self, sections: int) -> list[ViewBatch]:
        """Split along the batch as ``Tensor.tensor_split`` does (micro-batches)."""
        parts = [v.tensor_split(sections) for v in self.views]
        return [ViewBatch([p[i] for p in parts], m) for i, m in enumerate(self.missing.tensor_split(sections))]


ViewsInput = torch.Tensor | Sequence[torch.Tensor] | ViewBatch


@dataclass(frozen=True)
class MultiViewConfig:
    """The multi-view wrapper as data (saved in ``ModelConfig.model_kwargs``)."""

    backbone: str = "cmaf_net"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    num_views: int = 2
    attn_dim: int = 128
    view_dropout: float = 0.0
    drop_anchor: bool = False
    all_missing: str = "error"
    view_embedding: bool = True  # learned per-view offset: the gate knows which magnification it sees
    tasks: dict[str, int] | None = None  # None: one task with num_classes classes
    head_dropout: float = 0.0
    # {task: class names}, recorded so an exported model's config.json names every task's classes
    # (the primary task's names are also ModelConfig.class_names). None: not recorded.
    task_class_names: dict[str, list[str]] | None = None
    # [{"mpp": µm/px, "size": px}] per view, view 0 = the tile at the model's spacing and patch size:
    # what the inference engine cuts around each tile (wsi_cmaf.slide.views). None: not declared
    # (the model can be trained and called, but analyze_slide asks for it).
    views: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs))
        if self.tasks is not None:
            object.__setattr__(self, "tasks", check_tasks(self.tasks))
        problems = []
        if self.task_class_names is not None:
            names = {str(k): [str(c) for c in v] for k, v in dict(self.task_class_names).items()}
            object.__setattr__(self, "task_class_names", names)
            declared = self.tasks or {}
            for task, classes in names.items():
                if self.tasks is not None and task not in declared:
                    problems.append(f"task_class_names names task {task!r}, which is not one of {list(declared)}")
                elif task in declared and len(classes) != declared[task]:
                    problems.append(f"task_class_names[{task!r}] has {len(classes)} names for {declared[task]} classes")
                if len(set(classes)) != len(classes):
                    problems.append(f"task_class_names[{task!r}] repeats a name: {classes}")
        if self.views is not None:
            views, bad = _check_views(self.views)
            problems += bad
            object.__setattr__(self, "views", views)
            if isinstance(self.num_views, int) and len(views) != self.num_views:
                problems.append(f"views declares {len(views)} view(s) for num_views {self.num_views}")
        if not isinstance(self.num_views, int) or self.num_views < 1:
            problems.append(f"num_views must be an int >= 1, got {self.num_views!r}")
        if self.attn_dim < 1:
            problems.append(f"attn_dim must be >= 1, got {self.attn_dim}")
        if not 0.0 <= self.view_dropout < 1.0 or not 0.0 <= self.head_dropout < 1.0:
            problems.append("view_dropout and head_dropout must lie in [0, 1)")
        if self.all_missing not in _ALL_MISSING:
            problems.append(f"all_missing must be one of {_ALL_MISSING}, got {self.all_missing!r}")
        if self.backbone in ("multiview", "multitask"):
            problems.append("the backbone cannot itself be a multi-view model")
        if problems:
            raise ModelConfigError("invalid multi-view config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["backbone_kwargs"] = {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in self.backbone_kwargs.items()}
        return out


def _check_views(views: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """``views`` as [{"mpp": float, "size": int}] and the problems found (empty when valid)."""
    if not isinstance(views, (list, tuple)) or not views:
        return [], [f"views must be a non-empty list of {{mpp, size}} objects, got {views!r}"]
    out, problems = [], []
    for i, v in enumerate(views):
        mpp, size = (v.get("mpp"), v.get("size")) if isinstance(v, dict) else (None, None)
        if (not isinstance(mpp, (int, float)) or isinstance(mpp, bool) or not mpp > 0
                or isinstance(size, bool) or not isinstance(size, int) or size < 1
                or set(v) - {"mpp", "size"}):
            problems.append(f"views[{i}] must be {{mpp: µm/px > 0, size: px >= 1}}, got {v!r}")
            continue
        out.append({"mpp": float(mpp), "size": int(size)})
    return out, problems


class GatedViewAttention(nn.Module):
    """Ilse-style gated attention over V embeddings with a mask of missing views."""

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, attn_dim)
        self.u = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, emb: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V, D), present (B, V) bool -> fused (B, D), weights (B, V) (exactly 0 where absent).

        Rows without any present view get all-zero weights and a zero embedding.
        """
        logits = self.w(torch.tanh(self.v(emb)) * torch.sigmoid(self.u(emb))).squeeze(-1)
        logits = logits.masked_fill(~present, float("-inf"))
        any_present = present.any(dim=1, keepdim=True)
        # a row of only -inf would give NaN; give it zeros and zero its weights below
        weights = torch.softmax(logits.masked_fill(~any_present, 0.0), dim=1)
        weights = torch.where(present, weights, weights.new_zeros(()))
        # masked_fill instead of multiplying: 0 * inf/NaN embeddings would still be NaN
        fused = (weights.unsqueeze(-1) * emb.masked_fill(~present.unsqueeze(-1), 0.0)).sum(dim=1)
        return fused, weights


def _embedding_dim(backbone: nn.Module) -> int:
    """Width of ``forward_head(..., pre_logits=True)`` (timm's ``head_hidden_size`` or ``num_features``)."""
    for attr in ("head_hidden_size", "num_features"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelConfigError(f"cannot tell the embedding width of backbone {type(backbone).__name__}: it "
                           "needs forward_features/forward_head(pre_logits=True) and num_features")


class MultiViewNet(nn.Module):
    """Shared backbone over V views + gated attention fusion + one head per task."""

    def __init__(self, config: MultiViewConfig, num_classes: int = 2) -> None:
        super().__init__()
        tasks = config.tasks or {"malignancy": num_classes}
        primary = next(iter(tasks))
        if tasks[primary] != num_classes:
            raise ModelConfigError(f"num_classes {num_classes} disagrees with the first task "
                                   f"{primary!r} ({tasks[primary]} classes); the first task is the primary one")
        if config.backbone_kwargs.get("dfa"):
            raise ModelConfigError("CMAF-Net's DFA adds per-class offsets after its head, which multi-view "
                                   "fusion does not use (it fuses pre-logit embeddings); set dfa: false")
        backbone = create_model(config.backbone, num_classes=num_classes, **config.backbone_kwargs)
        if not (hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head")):
            raise ModelConfigError(f"backbone {config.backbone!r} has no forward_features/forward_head split")
        # The backbone's own classifier is replaced by the task heads on the fused embedding.
        if isinstance(backbone, CMAFNet):
            backbone.fc = nn.Identity()
        elif callable(reset := getattr(backbone, "reset_classifier", None)):
            reset(0)
        backbone_to_dict = getattr(getattr(backbone, "config", None), "to_dict", None)
        if callable(backbone_to_dict):  # save the backbone's full architecture, not the overrides
            config = dataclasses.replace(config, backbone_kwargs=backbone_to_dict())
        self.config = config
        self.num_classes = num_classes
        self.tasks = dict(tasks)
        self.backbone = backbone
        self.embed_dim = _embedding_dim(backbone)
        self.num_features = self.embed_dim
        self.view_embed = (nn.Parameter(torch.zeros(config.num_views, self.embed_dim))
                           if config.view_embedding else None)
        self.attention = GatedViewAttention(self.embed_dim, config.attn_dim)
        self.heads = TaskHeads(self.embed_dim, self.tasks, config.head_dropout)

    # ------------------------------------------------------------------ views and masks
    def _as_views(self, views: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(views, torch.Tensor):
            if views.dim() == 4 and self.config.num_views == 1:
                return [views]
            if views.dim() != 5:
                raise ModelError(f"views must be (B, V, 3, H, W) or a list of V (B, 3, H, W) tensors, "
                                 f"got shape {tuple(views.shape)}")
            views = list(views.unbind(1))
        views = list(views)
        if len(views) != self.config.num_views:
            raise ModelError(f"model takes {self.config.num_views} views, got {len(views)}")
        return views

    def view_mask(self, batch: int, missing: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Present-view mask (B, V) after the missing mask and, in training mode, view dropout."""
        v = self.config.num_views
        present = torch.ones(batch, v, dtype=torch.bool, device=device)
        if missing is not None:
            if tuple(missing.shape) != (batch, v):
                raise ModelError(f"missing mask must be (B, V) = {(batch, v)}, got {tuple(missing.shape)}")
            present = ~missing.to(device=device, dtype=torch.bool)
        if self.training and self.config.view_dropout > 0 and v > 1:
            drop = torch.rand(batch, v, device=device) < self.config.view_dropout
            if not self.config.drop_anchor:
                drop[:, 0] = False
            kept = present & ~drop
            # never drop every view: rows left empty keep their first present view
            first = torch.zeros_like(present).scatter_(1, present.long().argmax(dim=1, keepdim=True), True)
            present = torch.where(kept.any(dim=1, keepdim=True), kept, present & first)
        return present

    # ------------------------------------------------------------------ forward passes
    def _embed(self, x: torch.Tensor, aux: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if aux is not None and isinstance(self.backbone, CMAFNet):  # keep its KL/regulariser terms
            return self.backbone.forward_head(self.backbone.forward_features(x, aux), pre_logits=True, aux=aux)
        backbone = cast(SplitModel, self.backbone)  # __init__ refused backbones without the split
        return backbone.forward_head(backbone.forward_features(x), pre_logits=True)

    def _embed_views(self, views: list[torch.Tensor], present: torch.Tensor,
                     aux: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, V, D) embeddings; only present views go through the backbone, the rest stay 0.

        ``aux`` receives the backbone's aux terms over the present views (same-size views only).
        """
        b = present.shape[0]
        ref = views[0]
        same = all(t.shape == ref.shape for t in views)
        out = ref.new_zeros(b, len(views), self.embed_dim)
        if same:  # one backbone pass over every present view of the batch
            flat = torch.stack(views, dim=1).flatten(0, 1)
            idx = present.flatten().nonzero().squeeze(1)
            if idx.numel():
                emb = self._embed(flat.index_select(0, idx), aux)
                out = out.flatten(0, 1).index_copy(0, idx, emb.to(out.dtype)).view_as(out)
        else:  # views of different sizes: one pass per view
            for v, t in enumerate(views):
                idx = present[:, v].nonzero().squeeze(1)
                if idx.numel():
                    out[:, v] = out[:, v].index_copy(0, idx, self._embed(t.index_select(0, idx)).to(out.dtype))
        if self.view_embed is not None:
            out = out + self.view_embed.to(out.dtype)
        return out

    def _present_and_embeddings(self, views: ViewsInput, missing: torch.Tensor | None,
                                aux: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Present-view mask (B, V) and per-view embeddings (B, V, D)."""
        if isinstance(views, ViewBatch):
            if missing is not None:
                raise ModelError("a ViewBatch carries its missing mask; do not pass `missing` as well")
            missing = views.missing
            views = views.views
        view_list = self._as_views(views)
        present = self.view_mask(view_list[0].shape[0], missing, view_list[0].device)
        if self.config.all_missing == "error" and not bool(present.any(dim=1).all()):
            bad = (~present.any(dim=1)).nonzero().flatten().tolist()
            raise ModelError(f"every view is missing for sample(s) {bad[:10]} of the batch; drop those "
                             "tiles or build the model with all_missing='zeros' (head bias as output)")
        return present, self._embed_views(view_list, present, aux)

    def fuse(self, views: ViewsInput, missing: torch.Tensor | None = None,
             aux: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused embedding (B, D) and attention weights over views (B, V).

        A :class:`ViewBatch` carries its own mask; ``missing``, when also given, must be None.
        """
        present, emb = self._present_and_embeddings(views, missing, aux)
        return self.attention(emb, present)

    def forward_features(self, views: ViewsInput, missing: torch.Tensor | None = None) -> torch.Tensor:
        """Views (+ missing mask (B, V), True = missing) -> view tokens (B, V, D + 1).

        Token v is view v's embedding followed by a presence flag (1.0 present, 0.0 missing or
        dropped), so :meth:`forward_head` can pool the tokens without a separate mask.
        """
        present, emb = self._present_and_embeddings(views, missing, None)
        return torch.cat([emb, present.unsqueeze(-1).to(emb.dtype)], dim=-1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """View tokens -> logits (B, C) for one task, ``{task: logits}`` for several, or the fused
        embedding (B, num_features) when ``pre_logits``."""
        if x.ndim != 3 or x.shape[-1] != self.embed_dim + 1:
            raise ModelError(f"the multi-view head takes the (B, V, {self.embed_dim + 1}) view tokens of "
                             f"forward_features, got shape {tuple(x.shape)}")
        fused, _ = self.attention(x[..., :-1], x[..., -1] > 0.5)
        return fused if pre_logits else self._heads(fused)

    def _heads(self, fused: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        out = self.heads(fused)
        return out if len(out) > 1 else next(iter(out.values()))

    def forward(self, views: ViewsInput, missing: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Views -> logits (B, C), or ``{task: logits}`` when the model has several tasks."""
        return self.forward_head(self.forward_features(views, missing))

    def forward_with_aux(self, views: ViewsInput, missing: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor | dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Logits plus ``aux``: ``view_attn`` (B, V), ``view_present`` (B, V) and, for a CMAF-Net
        backbone, its own aux terms computed over the present views (so ``kl_s`` etc. have one
        entry per embedded view, not per sample; the objective averages them)."""
        aux: dict[str, torch.Tensor] = {}
        fused, weights = self.fuse(views, missing, aux)
        aux.update(view_attn=weights, view_present=weights > 0)
        return self._heads(fused), aux

    def extra_repr(self) -> str:
        return f"backbone={self.config.backbone}, num_views={self.config.num_views}, tasks={self.tasks}"


def _build(num_classes: int, **kwargs: Any) -> MultiViewNet:
    kwargs.pop("input_size", None)  # accepted by every registry model; the views set the sizes here
    config = from_dict(MultiViewConfig, kwargs, where="multi-view options", error=ModelConfigError)
    return MultiViewNet(config, num_classes=num_classes)


@register_model("multiview")
def multiview(num_classes: int = 2, **kwargs: Any) -> MultiViewNet:
    """Multi-view model: ``create_model("multiview", backbone="cmaf_net", num_views=2, ...)``."""
    return _build(num_classes, **kwargs)


@register_model("multitask")
def multitask(num_classes: int = 2, **kwargs: Any) -> MultiViewNet:
    """Single-view multi-task model: ``create_model("multitask", tasks={"malignancy": 2, "subtype": 8})``."""
    if kwargs.setdefault("num_views", 1) != 1:
        raise ModelConfigError("the 'multitask' model is single-view; use 'multiview' for several views")
    return _build(num_classes, **kwargs)
