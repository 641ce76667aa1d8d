"""Batched, on-device preprocessing and model execution for uint8 tiles."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; a name is checked (a valid torch device,
    and CUDA actually available when asked for), so a wrong device fails before any work."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from wsi_cmaf.errors import ConfigError

    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device {device!r} is not a torch device name ({exc})") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return resolved


def autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device`` (None = full precision)."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPU fp32 is the safe default: bf16 is faster but changes numbers; users opt in.
    return None


class TilePreprocessor(nn.Module):
    """uint8 NHWC tiles -> normalised float NCHW model input, all on the model's device.

    Order follows the paper: stain normalisation on the native tile, then bicubic resize
    to the model's input size, then channel normalisation. Doing it batched on the device
    avoids the per-tile CPU resizing that dominates simpler pipelines.
    """

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

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``tiles``: uint8 (B, H, W, 3) -> float32 (B, 3, S, S)."""
        x = tiles.permute(0, 3, 1, 2).float()
        if self.stain is not None:
            x = self.stain(x)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            down = x.shape[-1] > self.input_size
            mode = self.interpolation
            kwargs = {"align_corners": False} if mode in {"bilinear", "bicubic"} else {}
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode=mode,
                antialias=down and mode in {"bilinear", "bicubic"}, **kwargs,
            )
            # Bicubic overshoots; keep the model's input inside the range it was trained on.
            x = x.clamp_(0.0, 255.0)
        return (x - self.mean) / self.std


class BatchRunner:
    """Runs ``model`` over uint8 tiles in fixed-size batches and returns class probabilities.

    Batches are cut from each call's tiles only, never across calls, so a block's output
    does not depend on which other blocks ran (needed for bit-identical resume).
    A CUDA out-of-memory error halves the batch size and retries.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: TilePreprocessor,
        device: torch.device,
        batch_size: int,
        autocast: str = "auto",
    ) -> None:
        self.device = device
        self.model = model.to(device).eval()
        self.preprocess = preprocess.to(device).eval()
        self.batch_size = int(batch_size)
        self.dtype = autocast_dtype(device, autocast)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _batches(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    @torch.inference_mode()
    def _run(self, tiles: np.ndarray) -> np.ndarray:
        out = []
        for sl in self._batches(len(tiles)):
            batch = torch.from_numpy(np.ascontiguousarray(tiles[sl]))
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            x = self.preprocess(batch)
            with self._autocast():
                logits = self.model(x)
            out.append(torch.softmax(logits.float(), dim=1).cpu())
        return torch.cat(out).numpy()

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """``tiles`` uint8 (N, H, W, 3) -> float32 probabilities (N, C)."""
        if len(tiles) == 0:
            raise ValueError("BatchRunner called with no tiles")
        while True:
            try:
                return self._run(tiles)
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                logger.warning("CUDA out of memory; retrying with batch size %d", self.batch_size)
