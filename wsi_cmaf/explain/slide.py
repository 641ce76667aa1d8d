"""Slide-level explanations: pick tiles from a finished heatmap store and explain them.

:func:`explain_slide` re-reads only the chosen tiles from the slide, through the pixel pipeline
the store was made with (:func:`~wsi_cmaf.infer.replay.reopen_pixels`: the same grid, block-read
backend, stored Macenko fit and :class:`~wsi_cmaf.preprocess.TilePreprocessor`). The model must be
the one the store records (weights hash and config); anything else would explain a different
heatmap, so it is refused with :class:`~wsi_cmaf.errors.StoreMismatchError`.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_cmaf.errors import OutputError, StoreMismatchError, UsageError
from wsi_cmaf.explain.cmaf import attention_and_gate, gradcam_spatial
from wsi_cmaf.explain.common import ExplainError, NotCMAFNetError, unwrap
from wsi_cmaf.explain.generic import NT_TYPES, integrated_gradients, occlusion
from wsi_cmaf.explain.select import TileChoice, choose_tiles

logger = logging.getLogger(__name__)

#: saliency methods of ``wsi-cmaf explain`` (gradcam = Grad-CAM on CMAF-Net's spatial branch)
METHODS = ("ig", "occlusion", "gradcam")
GENERIC_METHODS = ("ig", "occlusion")
#: a recomputed probability further than this from the stored one means the pixels differ
PROB_TOLERANCE = 0.05


class UnfinishedStoreError(OutputError):
    """The heatmap store was never finalised: its analysis is still running or was interrupted."""


@dataclass(frozen=True)
class ExplainSettings:
    """How the maps are computed. ``nt_samples`` > 0 smooths the generic methods with captum's
    NoiseTunnel (SmoothGrad) at ``nt_stdev`` x the input range; ``batch`` tiles go through the
    model at once (IG runs ``batch x steps`` images per pass)."""

    methods: tuple[str, ...] = ("ig",)
    steps: int = 32
    nt_samples: int = 0
    nt_stdev: float = 0.15
    nt_type: str = "smoothgrad"
    batch: int = 4
    device: str = "cpu"

    def check(self, is_cmaf: bool) -> None:
        """Named errors for settings that cannot work, before any slide is read."""
        bad = [m for m in self.methods if m not in METHODS]
        if not self.methods or bad or len(set(self.methods)) != len(self.methods):
            raise UsageError(f"methods must be distinct names among {METHODS}, got {list(self.methods)}")
        if "gradcam" in self.methods and not is_cmaf:
            raise UsageError("gradcam (Grad-CAM on the spatial branch) exists only for CMAF-Net; "
                             f"use one of {GENERIC_METHODS} for this model")
        if self.steps < 1 or self.batch < 1 or self.nt_samples < 0 or self.nt_stdev < 0:
            raise UsageError(f"steps and batch must be >= 1, nt_samples and nt_stdev >= 0; got {self.steps}, "
                             f"{self.batch}, {self.nt_samples}, {self.nt_stdev}")
        if self.nt_type not in NT_TYPES:
            raise UsageError(f"noise tunnel type must be one of {NT_TYPES}, got {self.nt_type!r}")

    def map_name(self, method: str) -> str:
        """Name of a method's maps in the store and JSON: ``ig``, ``ig_smoothgrad`` ..."""
        return f"{method}_{self.nt_type}" if self.nt_samples and method in GENERIC_METHODS else method


@dataclass
class SlideExplanation:
    """Maps of the chosen tiles, in :class:`TileChoice` order.

    ``tiles``: uint8 (n, t, t, 3) slide pixels as the model read them (before stain and resize);
    ``saliency``: map name -> float32 (n, S, S) at model input size S; ``attention`` (mean over
    heads of the attention each location receives) and ``gate`` (mean gate, 1 = fused features)
    are None for models other than CMAF-Net, with the reason in ``cmaf_note``.
    """

    store: Path
    slide: Path
    choice: TileChoice
    class_names: list[str]
    positive_class: int
    threshold: float
    location: np.ndarray  # int64 (n, 4): level-0 x, y, w, h
    tile_um: float
    tiles: np.ndarray
    recomputed: np.ndarray
    saliency: dict[str, np.ndarray]
    attention: np.ndarray | None
    gate: np.ndarray | None
    tau: np.ndarray | None
    cmaf_note: str | None
    model: dict[str, Any]
    settings: ExplainSettings
    warnings: list[str] = field(default_factory=list)
    #: multi-view models: the gated attention weight of each view per tile (n, V), the views, and
    #: the context views' pixels (one uint8 (n, s, s, 3) array per view 1..V-1)
    view_weights: np.ndarray | None = None
    views: list[dict[str, Any]] | None = None
    context: list[np.ndarray] | None = None

    @property
    def is_cmaf(self) -> bool:
        """Whether the CMAF-Net maps (attention, gate) were computed."""
        return self.attention is not None or self.gate is not None

    @property
    def map_size(self) -> tuple[int, int]:
        """(H, W) of every map: the model's input size."""
        shape = next(iter(self.saliency.values())).shape
        return int(shape[1]), int(shape[2])


def open_finished_store(path: str | Path):
    """The :class:`HeatmapStore` at ``path``, read-only; named errors when it cannot be explained."""
    from wsi_cmaf.output.store import HeatmapStore

    store = HeatmapStore.open(path)  # OutputError: not a store / creation interrupted
    if not store.finalized:
        raise UnfinishedStoreError(f"{store.path} is not finished (its analysis is running or was "
                                   "interrupted); rerun `wsi-cmaf analyze` on the slide to complete it first")
    return store


def _check_model(store, resolved) -> None:
    from wsi_cmaf.infer.modelspec import config_identity
    from wsi_cmaf.output._json import json_diff

    ident = store.identity
    problems = json_diff(ident.get("weights_sha256"), resolved.weights_sha256, "weights_sha256")
    problems += json_diff(ident.get("model_config"), config_identity(resolved.config), "model_config")
    if problems:
        raise StoreMismatchError(
            f"{store.path} was made with another model ({ident.get('model')}, weights "
            f"{str(ident.get('weights_sha256'))[:12]}...); pass the same model with --model: "
            + "; ".join(problems[:4]))


def _cmaf_maps(module, x: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, str | None]:
    """(attention mean over heads, gate, tau, note) of one batch; None with a note when absent."""
    try:
        maps, gate = attention_and_gate(module, x)
    except NotCMAFNetError:
        raise
    except ExplainError as exc:  # an ablation without the CMAF block
        return None, None, None, str(exc)
    note = None if gate is not None else "this CMAF-Net has no gate (the 'no_gating' ablation)"
    return maps.received.mean(axis=1), gate, maps.tau, note


def _saliency(method: str, module, x: torch.Tensor, target: int, s: ExplainSettings,
              forward_args: tuple = ()) -> np.ndarray:
    nt: dict[str, Any] = {"nt_samples": s.nt_samples, "nt_stdev": s.nt_stdev, "nt_type": s.nt_type,
                          "forward_args": forward_args}
    if method == "ig":
        return integrated_gradients(module, x, target, n_steps=s.steps, internal_batch_size=x.shape[0] * s.steps, **nt)
    if method == "occlusion":
        return occlusion(module, x, target, **nt)
    return gradcam_spatial(module, x, target)


def explain_slide(store_path: str | Path, slide: str | Path | None = None, model: Any = None, *,
                  model_config: Any = None, top_k: int = 32, threshold: float | None = None,
                  settings: ExplainSettings | None = None) -> SlideExplanation:
    """Explain the ``top_k`` most malignant tiles and the ``top_k`` tiles nearest the decision
    threshold of a finished heatmap store.

    ``slide``: the slide file (default: the path the store records); it must be the same file
    (fingerprint). ``model``: as for ``analyze_slide``; None takes the project's default model.
    It must be the store's model (weights hash and config). ``threshold``: default the store's
    decision threshold. Raises :class:`UsageError` (bad k / settings),
    :class:`UnfinishedStoreError`, :class:`~wsi_cmaf.errors.StoreMismatchError`.
    """
    from wsi_cmaf.device import resolve_device
    from wsi_cmaf.infer.modelspec import resolve_model
    from wsi_cmaf.infer.replay import reopen_pixels
    from wsi_cmaf.models.cmaf_net import CMAFNet
    from wsi_cmaf.output.geojson import positive_class

    settings = settings or ExplainSettings()
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k <= 0:
        raise UsageError(f"top-k must be a positive whole number of tiles, got {top_k!r}")
    store = open_finished_store(store_path)
    attrs = store.attrs
    thr = float((attrs.get("inference") or {}).get("decision_threshold", 0.5) if threshold is None else threshold)
    pos = positive_class(store)
    choice = choose_tiles(store.probabilities(0)[pos], store.tissue(0), int(top_k), thr)
    device = resolve_device(settings.device)
    resolved = resolve_model(model, model_config)
    module = resolved.module.eval()
    architecture = type(unwrap(module)).__name__  # before any TileViewForward wrapping below
    kwargs = resolved.config.model_kwargs or {}
    multi_view = bool(kwargs.get("views")) and int(kwargs.get("num_views", 2)) > 1
    if multi_view or len(kwargs.get("tasks") or {}) > 1:
        # explained as a function of the tile, on the primary task (see wsi_cmaf.explain.views)
        from wsi_cmaf.explain.views import TileViewForward

        module = TileViewForward(module).eval()
    is_cmaf = isinstance(unwrap(module), CMAFNet)
    settings.check(is_cmaf)
    _check_model(store, resolved)
    src = attrs.get("slide") or {}
    slide_path = Path(slide if slide is not None else src.get("path") or "")
    if slide is None and not slide_path.is_file():
        raise UsageError(f"the slide the store records ({slide_path}) is not there; pass --slide")
    with ExitStack() as stack:
        replay = reopen_pixels(store, resolved, slide_path, stack)
        grid, mc, stain, prep, warnings = replay.grid, resolved.config, replay.stain, replay.preprocess, replay.warnings
        fargs: tuple[torch.Tensor, ...] = ()
        weights, context = None, None
        if multi_view:
            assert resolved.views is not None  # resolve_model reads them from the same model_kwargs
            view_pixels, views, missing = replay.read_views(resolved.views, choice.rows, choice.cols)
            tiles, context = view_pixels[0], view_pixels[1:]
            views = [v.to(device) for v in views]
            x_all, fargs = views[0], (*views[1:], missing.to(device))
            from wsi_cmaf.explain.views import view_weights

            weights = view_weights(resolved.module.to(device), views, fargs[-1]).cpu().numpy()
        else:
            tiles = replay.read_tiles(choice.rows, choice.cols)
    module = module.to(device)
    if not multi_view:
        x_all = prep.to(device)(torch.from_numpy(tiles).to(device))
    with torch.no_grad():
        recomputed = torch.softmax(module(x_all, *fargs).float(), dim=1)[:, pos].cpu().numpy()
    off = np.abs(recomputed - choice.probability) > PROB_TOLERANCE
    if off.any():
        warnings.append(f"{int(off.sum())} tile(s) give a probability more than {PROB_TOLERANCE} away from the "
                        "stored one (different precision or device than the analysis)")
    sal: dict[str, list[np.ndarray]] = {settings.map_name(m): [] for m in settings.methods}
    att, gate, tau, note = [], [], None, None if is_cmaf else (
        f"attention and gate maps exist only for CMAF-Net; {resolved.name} "
        f"({architecture}) "
        "gets the generic maps only")
    for i in range(0, len(tiles), settings.batch):
        x = x_all[i:i + settings.batch]
        fa = tuple(t[i:i + settings.batch] for t in fargs)
        logger.info("explaining tiles %d-%d of %d", i + 1, i + len(x), len(tiles))
        for m in settings.methods:
            sal[settings.map_name(m)].append(_saliency(m, module, x, pos, settings, fa))
        if is_cmaf:
            a, g, tau, note = _cmaf_maps(module, x)
            att.append(a)
            gate.append(g)
    geo = store.geometry
    ox, oy = np.asarray([grid.tile_location(int(r), int(c)) for r, c in zip(choice.rows, choice.cols)]).T
    tw, th = (int(round(v)) for v in (geo.tile_level0 or geo.stride_level0 or (0, 0)))
    location = np.stack([ox, oy, np.full_like(ox, tw), np.full_like(ox, th)], axis=1).astype(np.int64)
    return SlideExplanation(
        store=store.path, slide=slide_path, choice=choice, class_names=list(store.class_names),
        positive_class=pos, threshold=thr, location=location,
        tile_um=float(grid.config.tile_size * grid.config.mpp), tiles=tiles, recomputed=recomputed,
        saliency={k: np.concatenate(v).astype(np.float32) for k, v in sal.items()},
        # one model made every batch, so a map is there for all of them or for none
        attention=None if not att or att[0] is None else np.concatenate([a for a in att if a is not None]
                                                                        ).astype(np.float32),
        gate=None if not gate or gate[0] is None else np.concatenate([g for g in gate if g is not None]
                                                                     ).astype(np.float32),
        tau=tau, cmaf_note=note,
        model={"name": resolved.name, "architecture": architecture,
               "weights_sha256": resolved.weights_sha256, "weights_note": resolved.note,
               "input_size": int(mc.input_size), "stain": stain},
        settings=settings, warnings=warnings, view_weights=weights,
        views=[dict(v) for v in kwargs["views"]] if multi_view else None, context=context)
