"""Model input preparation shared by inference, training and explanations.

uint8 slide pixels become normalised float model input here, batched on the model's device:
:class:`TilePreprocessor` for a tile (stain normalisation on the native tile, resize to the
model's input size with :func:`resize_matrix`, channel normalisation), and for multi-view models
the views a model declares (:func:`model_views`), their packing into one uint8 row per tile
(:func:`pack_views`) and :class:`ViewsPreprocessor`, which unpacks the rows and preprocesses every
view like a tile. Stain normalisers themselves are in :mod:`wsi_cmaf.stain`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.slide.views import BlockViews, ViewSpec

logger = logging.getLogger(__name__)


def resize_matrix(n_in: int, n_out: int, mode: str = "bicubic") -> torch.Tensor:
    """(n_out, n_in) matrix that resamples one axis exactly as ``F.interpolate(mode=...)`` does.

    Every ``F.interpolate`` mode is linear and separable, so the matrix is its response to the
    impulses of an identity image (antialiasing included when it shrinks, the same rule
    :class:`TilePreprocessor` applies). Why a matrix: on CPU ``F.interpolate(mode="bicubic")``
    runs ~5x slower than the two small matrix products that give the same numbers (50 -> 64 px,
    256 tiles: ~30 ms vs ~5 ms), which is a tenth of a cheap model's time per tile.
    """
    mode = "bilinear" if mode == "pil_bilinear" else mode  # same filter; the rounding is the caller's
    eye = torch.eye(n_in, dtype=torch.float64).view(1, 1, n_in, n_in)
    smooth = mode in {"bilinear", "bicubic"}
    kwargs = {"align_corners": False, "antialias": n_out < n_in} if smooth else {}
    # Only axis -2 changes size; axis -1 keeps its size, which every mode maps to itself.
    return F.interpolate(eye, size=(n_out, n_in), mode=mode, **kwargs)[0, 0].float()


class TilePreprocessor(nn.Module):
    """uint8 NHWC tiles -> normalised float NCHW model input, all on the model's device.

    Order follows the paper: stain normalisation on the native tile, then bicubic resize
    to the model's input size, then channel normalisation. Doing it batched on the device
    avoids the per-tile CPU resizing that dominates simpler pipelines; the resize is two
    matrix products with :func:`resize_matrix` (same result as ``F.interpolate``, faster).
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str = "bicubic",
        stain: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.interpolation = interpolation
        self.stain = stain
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self._matrices: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _matrix(self, n_in: int, device: torch.device) -> torch.Tensor:
        key = (n_in, device)
        if key not in self._matrices:
            self._matrices[key] = resize_matrix(n_in, self.input_size, self.interpolation).to(device)
        return self._matrices[key]

    def _pil_bilinear(self, tiles: torch.Tensor, uint8_kernel: bool | None = None) -> torch.Tensor:
        """PIL-style resize: antialiased bilinear on uint8, rounded to uint8 values (WSInfer's pixels);
        uint8 from torch's CPU kernel, float32 holding whole numbers from the matrices elsewhere.

        On CPU torch's uint8 kernel (channels_last) reproduces PIL's result (measured against
        PIL on slide patches: mean |diff| < 0.01 grey level, max 1) about 10x faster than the
        float path; elsewhere the float matrices are used and rounded the same way.
        """
        x = tiles.permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels_last, no copy
        if x.device.type == "cpu" if uint8_kernel is None else uint8_kernel:
            size = (self.input_size, self.input_size)
            return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        h, w = x.shape[-2:]
        x = self._matrix(h, x.device) @ x.to(torch.float32) @ self._matrix(w, x.device).T
        return x.round_().clamp_(0.0, 255.0)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``tiles``: uint8 (B, H, W, 3) -> float32 (B, 3, S, S)."""
        if self.interpolation == "pil_bilinear" and self.stain is None and tiles.shape[1:3] != (self.input_size,) * 2:
            # uint8 - float32 promotes exactly as .to(float32) then subtracting would, in one pass
            return torch.sub(self._pil_bilinear(tiles), self.mean).div_(self.std)
        x = tiles.permute(0, 3, 1, 2).to(torch.float32, copy=True)  # own copy: modified in place below
        if self.stain is not None:
            x = self.stain(x)
        h, w = x.shape[-2:]
        if h != self.input_size or w != self.input_size:
            x = self._matrix(h, x.device) @ x @ self._matrix(w, x.device).T
            # Bicubic overshoots; keep the model's input inside the range it was trained on.
            x = x.clamp_(0.0, 255.0)
        # in place: x is always this call's own tensor here (a fresh float copy at least)
        return x.sub_(self.mean).div_(self.std)


def model_views(module: nn.Module, config, name: str = "model") -> tuple[ViewSpec, ...] | None:
    """The views of a multi-view model, or None for a single-view one.

    Taken from the config's ``model_kwargs.views``, else from the module's own config (a
    :class:`~wsi_cmaf.models.multiview.MultiViewConfig`). Raises :class:`ModelConfigError` when a
    model with several views declares none, declares a different number, or when view 0 is not
    the tile (``spacing_um_px`` µm/px, ``patch_size_pixels`` px).
    """
    kwargs = dict(getattr(config, "model_kwargs", None) or {})
    own = getattr(module, "config", None)
    declared = kwargs.get("views") or getattr(own, "views", None)
    n_views = kwargs.get("num_views", getattr(own, "num_views", None))
    if not declared:
        if isinstance(n_views, int) and n_views > 1:
            raise ModelConfigError(
                f"model {name!r} takes {n_views} views but declares none: add model_kwargs.views, e.g. "
                f'[{{"mpp": {config.spacing_um_px:g}, "size": {config.patch_size_pixels}}}, '
                f'{{"mpp": {4 * config.spacing_um_px:g}, "size": {config.patch_size_pixels}}}] (view 0 = the tile)')
        return None
    try:
        views = tuple(ViewSpec(float(v["mpp"]), int(v["size"])) for v in declared)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelConfigError(f"model {name!r}: views must be a list of {{mpp, size}}, got {declared!r}") from exc
    if isinstance(n_views, int) and len(views) != n_views:
        raise ModelConfigError(f"model {name!r} takes {n_views} views but declares {len(views)}: {declared}")
    tile = views[0]
    if tile.size != config.patch_size_pixels or abs(tile.mpp - config.spacing_um_px) > 1e-9 * config.spacing_um_px:
        raise ModelConfigError(
            f"model {name!r}: view 0 must be the tile ({config.spacing_um_px:g} µm/px, {config.patch_size_pixels} px: "
            f"spacing_um_px and patch_size_pixels), got {tile.mpp:g} µm/px, {tile.size} px")
    return views


def sample_input(views: Sequence[ViewSpec] | None, input_size: int) -> tuple:
    """A one-sample model input: ``(x,)`` for a tile model, ``(views, missing)`` for a multi-view one."""
    x = torch.zeros(1, 3, input_size, input_size)
    if not views:
        return (x,)
    return [x] * len(views), torch.zeros(1, len(views), dtype=torch.bool)


def pack_views(item: BlockViews) -> np.ndarray:
    """(N, L) uint8 rows: every view's pixels (row-major, view after view), then V missing flags."""
    n = item.rows.size
    parts = [v.reshape(n, -1) for v in item.views] + [item.missing.astype(np.uint8)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


class ViewsPreprocessor(nn.Module):
    """Packed rows (:func:`pack_views`) -> (list of V float (B, 3, S, S), missing bool (B, V)).

    Every view goes through the same :class:`TilePreprocessor` as a tile.
    """

    def __init__(self, tile: nn.Module, sizes: Sequence[int]) -> None:
        super().__init__()
        self.tile = tile
        self.sizes = [int(s) for s in sizes]

    def forward(self, packed: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        b, start, views = packed.shape[0], 0, []
        for s in self.sizes:
            n = s * s * 3
            views.append(self.tile(packed[:, start:start + n].reshape(b, s, s, 3)))
            start += n
        return views, packed[:, start:start + len(self.sizes)].bool()
