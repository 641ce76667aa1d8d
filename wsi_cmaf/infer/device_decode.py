"""Device-side JPEG decoding of block reads (``InferenceConfig.decode="device"``, ``--decode device``).

The CPU path decodes blocks through a slide backend on the reader threads. With ``decode="device"``
the compressed tiles of a JPEG-tiled TIFF/SVS level (:mod:`wsi_cmaf.slide.jpeg_tiles`) are
decoded by ``torchvision.io.decode_jpeg`` on the model's device instead: nvJPEG on CUDA (one
batched call per block), libjpeg-turbo on CPU. The windows, resizing, cutting and padding follow
the CPU path (:mod:`wsi_cmaf.infer.device_windows`), on that device.

Who does what:

* :func:`plan_decode` decides, before the store is opened, whether the slide's grid level can be
  decoded this way; a level that cannot (JPEG 2000, DICOM, uncompressed, strips, multi-view
  models) falls back to the CPU path with one info line. :func:`decode_identity` adds the decoder
  really used to the store's resume identity, so a store never resumes with the other decoder.
* :func:`read_jpeg_block_task` runs on the reader threads: it reads the raw bytes of the storage
  tiles a block needs. On a CPU device it also decodes there (the reader threads are the CPU's
  decoders); on CUDA it hands the bytes over (:class:`RawBlock`) and :class:`DecodedFeed` decodes
  them on the GPU in the thread that feeds the model, which :class:`DeviceTilesRunner` then runs
  without a host round trip.
* A stream ``decode_jpeg`` refuses fails only its storage tile: the grid tiles whose pixels touch
  it are left out (:class:`~wsi_cmaf.infer.dask_tasks.PartialBlock`), chosen by the same rule as the
  CPU path's cell-by-cell re-read (:func:`~wsi_cmaf.infer.dask_tasks.tiles_touching`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wsi_cmaf.infer.buffers import PendingProbs, sync_event
from wsi_cmaf.infer.dask_tasks import BlockFailure, PartialBlock, tiles_touching
from wsi_cmaf.infer.device_windows import StripWindow, block_windows, cut_strip
from wsi_cmaf.infer.runner import BatchRunner
from wsi_cmaf.slide.grid import Block, BlockTiles, TileGrid
from wsi_cmaf.slide.jpeg_tiles import JpegLevel, NotJpegTiledError, drop_thread_readers, jpeg_level, thread_reader
from wsi_cmaf.slide.reads import _tile_shape

logger = logging.getLogger(__name__)

__all__ = ["DECODERS", "DecodePlan", "DecodedFeed", "DeviceTilesRunner", "RawBlock", "decode_block",
           "decode_identity", "plan_decode", "read_jpeg_block_task"]

#: values of ``InferenceConfig.decode``
DECODERS = ("cpu", "device")


@dataclass(frozen=True)
class JpegSource:
    """What a reader task needs (picklable): the level, the block reader's call overhead (for the
    same strips as the CPU path) and whether to decode on the reader thread (CPU device)."""

    level: JpegLevel
    call_overhead_px: float | None
    decode_on_reader: bool


@dataclass
class RawBlock:
    """A block's compressed storage tiles, read but not decoded: ``streams`` {tile index: bytes or
    None for a tile the file does not store} and the strip windows they fill."""

    block: Block
    windows: list[StripWindow]
    streams: dict[int, bytes | None]


@dataclass(frozen=True)
class DecodePlan:
    """Device decoding of one slide: where reads come from and which device decodes."""

    source: JpegSource
    device: torch.device

    @property
    def decoder(self) -> str:
        """Name recorded in the store's identity: ``device:cuda`` or ``device:cpu``."""
        return f"device:{self.device.type}"


def plan_decode(pixels: Any, grid_config: Any, cfg: Any, device: torch.device,
                views: Any = None) -> DecodePlan | None:
    """The device-decoding plan for this slide, or None for the CPU path.

    None when ``cfg.decode`` is "cpu", and, with one info line saying why, when the level the grid
    reads is not JPEG-tiled TIFF or the model reads several views per tile.
    """
    if getattr(cfg, "decode", "cpu") != "device":
        return None
    path = pixels.path
    if views:
        logger.info("%s: the model reads several views per tile; blocks are decoded on the CPU", path)
        return None
    level = 0 if grid_config.source == "level0" else pixels.level_for_mpp(grid_config.mpp, grid_config.mpp_tolerance)
    try:
        info = jpeg_level(path, level, tuple(pixels.level_dimensions[level]))
    except NotJpegTiledError as exc:
        logger.info("%s; blocks are decoded on the CPU", exc)
        return None
    device = torch.device(device)
    overhead = getattr(pixels, "call_overhead_px", None)
    logger.info("%s: level %d JPEG tiles are decoded by torchvision on %s", path, level, device)
    return DecodePlan(JpegSource(info, None if overhead is None else float(overhead), device.type == "cpu"), device)


def decode_identity(plan: DecodePlan | None) -> dict[str, str]:
    """What decoding adds to a store's resume identity: ``{"decoder": ...}`` for device decoding,
    nothing for the CPU path (stores made before device decoding existed still resume)."""
    return {"decoder": plan.decoder} if plan is not None else {}


def read_jpeg_block_task(source: JpegSource, grid: TileGrid, block: Block) -> BlockTiles | RawBlock | BlockFailure:
    """Reader-thread task: the raw tiles of ``block`` (decoded here when the device is the CPU).
    An error other than an undecodable stream fails the block (:class:`BlockFailure`)."""
    try:
        windows = block_windows(grid, block, source.level, source.call_overhead_px)
        wanted = sorted({i for w in windows for i in w.needed})
        streams = dict(zip(wanted, thread_reader(source.level.path).read(source.level, wanted)))
        raw = RawBlock(block, windows, streams)
        return decode_block(raw, grid, source.level, torch.device("cpu")) if source.decode_on_reader else raw
    except Exception as exc:  # IO and geometry errors of any kind: isolate them to this block
        logger.warning("block %s of %s failed: %s", block.index, source.level.path, exc)
        drop_thread_readers()
        return BlockFailure(block.index, f"{type(exc).__name__}: {exc}")


def _decode_streams(streams: dict[int, bytes | None], level: JpegLevel,
                    device: torch.device) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Decoded tiles {index: uint8 (3, h, w)} and failures {index: reason}; a failing batch is
    decoded again tile by tile to find the bad streams."""
    from torchvision.io import ImageReadMode, decode_jpeg

    present = [i for i, s in streams.items() if s is not None]
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams.values() if s is not None]
    images: dict[int, torch.Tensor] = {}
    failed: dict[int, str] = {}
    if not data:
        return images, failed
    try:
        images = dict(zip(present, decode_jpeg(data, mode=ImageReadMode.RGB, device=device)))
    except RuntimeError:
        for i, d in zip(present, data):
            try:
                images[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as exc:
                failed[i] = f"{type(exc).__name__}: {exc}".strip()
    tw, th = level.tile
    for i, img in list(images.items()):
        if img.shape[0] != 3 or img.shape[1] < level.tile_box(i)[3] or img.shape[2] < level.tile_box(i)[2]:
            failed[i] = f"ValueError: tile decoded to {tuple(img.shape)}, the level's tiles are (3, {th}, {tw})"
            del images[i]
    return images, failed


def _canvas(win: StripWindow, level: JpegLevel, images: dict[int, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The level pixels of ``win.box`` (H, W, 3): decoded tiles pasted, white elsewhere."""
    x0, y0, x1, y1 = win.box
    canvas = torch.full((y1 - y0, x1 - x0, 3), 255, dtype=torch.uint8, device=device)
    for i in win.needed:
        img = images.get(i)
        if img is None:
            continue
        tx, ty, tw, th = level.tile_box(i)
        ax, ay, bx, by = max(tx, x0), max(ty, y0), min(tx + tw, x1), min(ty + th, y1)
        if bx > ax and by > ay:
            canvas[ay - y0:by - y0, ax - x0:bx - x0] = img[:, ay - ty:by - ty, ax - tx:bx - tx].permute(1, 2, 0)
    return canvas


def _failed_cells(windows: list[StripWindow], level: JpegLevel, failed: dict[int, str]) -> list[tuple]:
    """(x, y, w, h, reason) level px of each failed tile inside each window, in window order: the
    cells the CPU path's cell-by-cell re-read would report."""
    cells = []
    for win in windows:
        x0, y0, x1, y1 = win.box
        for i in win.needed:
            if i in failed:
                tx, ty, tw, th = level.tile_box(i)
                ax, ay, bx, by = max(tx, x0), max(ty, y0), min(tx + tw, x1), min(ty + th, y1)
                if bx > ax and by > ay:
                    cells.append((ax, ay, bx - ax, by - ay, failed[i]))
    return cells


def decode_block(raw: RawBlock, grid: TileGrid, level: JpegLevel, device: torch.device,
                 host: bool | None = None) -> BlockTiles:
    """Decode ``raw`` on ``device`` into the block's tissue tiles (a :class:`PartialBlock` when some
    streams were undecodable). Tiles are numpy on CPU or with ``host``, else a tensor on ``device``."""
    images, failed = _decode_streams(raw.streams, level, device)
    rows, cols = grid.tissue_indices(raw.block)
    tiles = torch.empty((rows.size, *_tile_shape(grid), 3), dtype=torch.uint8, device=device)
    pos = {(int(r), int(c)): k for k, (r, c) in enumerate(zip(rows, cols))}
    for win in raw.windows:
        index = torch.tensor([pos[(int(r), int(c))] for r, c in zip(win.rows, win.cols)], device=device)
        tiles[index] = cut_strip(grid, win, _canvas(win, level, images, device))
    out: np.ndarray | torch.Tensor = tiles
    if host or (host is None and device.type == "cpu"):
        out = tiles.cpu().numpy()
    cells = _failed_cells(raw.windows, level, failed)
    if not cells:
        return BlockTiles(raw.block, out, rows, cols)
    bad = tiles_touching(grid, rows, cols, [c[:4] for c in cells])
    logger.warning("block %s of %s: %d of %d tissue tile(s) undecodable (%s)", raw.block.index, level.path,
                   int(bad.sum()), bad.size, cells[0][4])
    keep = ~bad
    kept = out[keep] if isinstance(out, np.ndarray) else out[torch.from_numpy(keep).to(device)]
    return PartialBlock(raw.block, kept, rows[keep], cols[keep], rows[bad], cols[bad], cells[0][4])


class DecodedFeed:
    """A :class:`~wsi_cmaf.infer.stream.BlockFeed` of :func:`read_jpeg_block_task` results with its
    :class:`RawBlock` items decoded on ``plan.device`` as they are taken. ``host``: give numpy
    tiles (for the stain fit from whole blocks) instead of device tensors."""

    def __init__(self, feed: Any, plan: DecodePlan, grid: TileGrid, host: bool = False) -> None:
        self._feed, self._plan, self._grid, self._host = feed, plan, grid, host

    def start(self) -> DecodedFeed:
        """Submit the first reads (see ``BlockFeed.start``)."""
        self._feed.start()
        return self

    def __iter__(self) -> Iterator[BlockTiles | BlockFailure]:
        for item in self._feed:
            if isinstance(item, RawBlock):
                try:
                    item = decode_block(item, self._grid, self._plan.source.level, self._plan.device, self._host)
                except Exception as exc:  # a device-side error of this block only (not a bad stream)
                    logger.warning("block %s: device decoding failed: %s", item.block.index, exc)
                    item = BlockFailure(item.block.index, f"{type(exc).__name__}: {exc}")
            yield item

    def cancel(self) -> None:
        """Cancel reads still in flight."""
        self._feed.cancel()


class DeviceTilesRunner(BatchRunner):
    """:class:`~wsi_cmaf.infer.runner.BatchRunner` that also takes uint8 NHWC tiles already on its
    device (a torch tensor): they go to the model without a host copy. On CUDA the runner's stream
    waits for the work of the stream that made the tiles (the decoding thread's current stream)."""

    def submit(self, tiles: Any) -> PendingProbs:
        """As ``BatchRunner.submit``; ``tiles`` may be a tensor (CPU tensors are viewed as numpy)."""
        if isinstance(tiles, torch.Tensor) and tiles.device.type == "cpu":
            tiles = tiles.numpy()
        return super().submit(tiles)

    @torch.inference_mode()
    def _enqueue_cuda(self, tiles: Any) -> PendingProbs:
        if not isinstance(tiles, torch.Tensor):
            return super()._enqueue_cuda(tiles)
        n = len(tiles)
        pending = PendingProbs(n)
        producer = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.stream(self.stream):
                self.stream.wait_stream(producer)
                tiles.record_stream(self.stream)  # made on another stream: keep its memory until we are done
                for sl in self._batches(n):
                    m = sl.stop - sl.start
                    batch = tiles[sl]
                    if self.padded(m) > m:  # zero rows: deterministic, and their outputs are dropped
                        batch = torch.cat([batch, batch.new_zeros((self.padded(m) - m, *batch.shape[1:]))])
                    self._copy_out(pending, sl, self._forward(batch)[:m])
                pending.event = sync_event()
                pending.event.record(self.stream)
        except BaseException:
            self.stream.synchronize()
            pending.discard()
            raise
        return pending
