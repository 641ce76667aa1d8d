"""The pixel pipeline of an analysis, and how to reopen the one a finished store records.

:func:`pixel_reader` is the reader an analysis decodes pixels with (thumbnails, stain sample,
blocks). :func:`reopen_pixels` rebuilds, from a heatmap store and the slide it was made from,
everything the analysis fed its model with: the same tile grid (from the store's tissue
fractions), the same block-read backend, the same stored Macenko fit and the same
:class:`~wsi_cmaf.preprocess.TilePreprocessor`, so that code reading a store's tiles again
(explanations) sees the model's input pixel for pixel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_cmaf.errors import StoreMismatchError
from wsi_cmaf.infer.config import InferenceConfig
from wsi_cmaf.infer.inputs import load_inputs, restore_stain, run_identity
from wsi_cmaf.output._json import json_diff, jsonable
from wsi_cmaf.preprocess import TilePreprocessor, ViewsPreprocessor, pack_views
from wsi_cmaf.qc.stage import qc_identity
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reader import SlideReader, open_slide
from wsi_cmaf.slide.reads import block_read_backend, read_tile
from wsi_cmaf.slide.tissue import TissueConfig
from wsi_cmaf.slide.views import read_block_views

logger = logging.getLogger(__name__)


def pixel_reader(reader: SlideReader, cfg: InferenceConfig, stack: ExitStack) -> SlideReader:
    """The reader that decodes pixels (thumbnails, stain sample, blocks) for ``reader``'s slide.

    Usually ``reader`` itself; for TIFF-family slides OpenSlide opened, a tiffslide reader of the
    same pyramid (see :func:`~wsi_cmaf.slide.reads.block_read_backend`), given the µm/px the
    opening reader resolved and closed with ``stack``. Metadata always comes from ``reader``.
    """
    if cfg.block_backend == "auto":
        backend = block_read_backend(reader)
    else:
        backend = reader.backend if cfg.block_backend == "same" else cfg.block_backend
    if backend == reader.backend:
        return reader
    logger.info("pixels of %s are read with %s (metadata from %s)", reader.path.name, backend, reader.backend)
    return stack.enter_context(open_slide(reader.path, backend=backend, mpp=reader.mpp))


@dataclass
class ReopenedPixels:
    """A store's pixel pipeline, reopened: ``pixels`` decodes, ``grid`` places the tiles,
    ``preprocess`` turns uint8 tiles into model input (with the stored stain fit, if any).
    ``stain`` is the normalisation the analysis used ("macenko" or "none"); ``warnings`` say
    where the replay may differ from the analysis."""

    reader: SlideReader
    pixels: SlideReader
    grid: TileGrid
    stain: str
    preprocess: TilePreprocessor
    warnings: list[str] = field(default_factory=list)

    def read_tiles(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """uint8 (n, t, t, 3) tiles (rows[i], cols[i]) as the analysis read them (before preprocessing)."""
        return np.stack([read_tile(self.pixels, self.grid, int(r), int(c)) for r, c in zip(rows, cols)])

    def read_views(self, specs: Sequence[Any], rows: np.ndarray,
                   cols: np.ndarray) -> tuple[list[np.ndarray], list[torch.Tensor], torch.Tensor]:
        """A multi-view model's views (``ViewSpec``s) of the tiles, read and preprocessed as the
        analysis did: (pixels of every view, each (n, s, s, 3); preprocessed views; missing (n, V))."""
        item = read_block_views(self.pixels, self.grid, None, specs, rows=np.asarray(rows, np.int64),
                                cols=np.asarray(cols, np.int64))
        prep = ViewsPreprocessor(self.preprocess, [s.size for s in specs])
        views, missing = prep(torch.from_numpy(pack_views(item)))
        return item.views, views, missing


def reopen_pixels(store: Any, resolved: Any, slide: str | Path, stack: ExitStack) -> ReopenedPixels:
    """The pixel pipeline ``store`` (a finished :class:`~wsi_cmaf.output.store.HeatmapStore`) was
    made with, for ``resolved`` (its :class:`~wsi_cmaf.infer.modelspec.ResolvedModel`) on ``slide``.

    The slide is opened with the µm/px the analysis used when that was not the file's own
    (override or estimate) and closed with ``stack``. Raises
    :class:`~wsi_cmaf.errors.StoreMismatchError` when ``slide`` is another file than the store's
    (fingerprint) or the store's tile grid cannot be rebuilt.
    """
    src = store.attrs.get("slide") or {}
    overridden = src.get("mpp_source") in ("override", "estimated from nuclei")
    mpp = tuple(src["mpp"]) if overridden and src.get("mpp") else None
    reader = stack.enter_context(open_slide(Path(slide), mpp=mpp))
    if reader.fingerprint() != store.identity.get("slide_fingerprint"):
        raise StoreMismatchError(f"{slide} is not the slide {store.path.name} was made from "
                                 f"(that was {src.get('path')}); pass the same file with --slide")
    cfg = _inference_config(store)
    grid, stain, facts = _rebuild_inputs(store, reader, resolved, cfg)
    pixels = pixel_reader(reader, cfg, stack)
    warnings: list[str] = []
    module = _stain_module(reader, grid, stain, facts, warnings)
    mc = resolved.config
    prep = TilePreprocessor(mc.input_size, tuple(mc.mean), tuple(mc.std), mc.resize_interpolation, module)
    return ReopenedPixels(reader, pixels, grid, stain, prep, warnings)


def _rebuild_inputs(store: Any, reader: SlideReader, resolved: Any,
                    cfg: InferenceConfig) -> tuple[TileGrid, str, Any]:
    """The run's grid, stain method and stored stain facts, exactly as a resumed analysis would reuse them."""
    ident = store.identity
    gcfg = GridConfig(**ident["grid"]["config"])
    tissue = dict(ident["tissue"])
    if tissue.get("pen_hue_range") is not None:
        tissue["pen_hue_range"] = tuple(tissue["pen_hue_range"])
    identity = run_identity(reader, resolved, gcfg, TissueConfig(**tissue), ident["stain"])
    identity.update(qc_identity(cfg))  # as the analysis extends it (tiles left out by the QC)
    # A device-decoded store names its decoder; the replay decodes the same tiles on the CPU, and a
    # tile whose pixels differ shows up as a recomputed probability off the stored one.
    identity.update({k: ident[k] for k in ("decoder",) if k in ident})
    inputs = load_inputs(store.path, identity, reader, gcfg)
    if inputs is None:
        problems = json_diff(ident, jsonable(identity))
        raise StoreMismatchError(f"{store.path}: cannot rebuild the analysis's tile grid from it ("
                                 + ("; ".join(problems[:4]) or "the store keeps no complete tissue grid; "
                                    "analyse the slide again with overwrite") + ")")
    return inputs.grid, ident["stain"], inputs.stain


def _stain_module(reader: SlideReader, grid: TileGrid, method: str, facts: Any, warnings: list[str]) -> Any:
    if method != "macenko":
        return None
    if facts is None:  # the analysis stores its stain fit before any block uses it
        raise StoreMismatchError("the store keeps no stain fit although its analysis used Macenko normalisation; "
                                 "analyse the slide again with overwrite")
    module, warning = restore_stain(facts)
    if warning:
        warnings.append(f"stain: {warning}")
    return module


def _inference_config(store: Any) -> InferenceConfig:
    """The store's recorded inference settings."""
    return InferenceConfig.from_dict(store.attrs.get("inference"))
