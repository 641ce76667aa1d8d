"""Batched model execution for uint8 tiles, preprocessed on the device (:mod:`wsi_cmaf.preprocess`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from wsi_cmaf.device import autocast_dtype
from wsi_cmaf.infer.buffers import HostBufferRing, PendingProbs, sync_event
from wsi_cmaf.infer.prepared import device_lock, prepared_model

logger = logging.getLogger(__name__)


class BatchRunner:
    """Runs ``model`` over uint8 tiles in batches and returns class probabilities.

    Batches are cut from each call's tiles only, never across calls, so a block's output
    does not depend on which other blocks ran (needed for bit-identical resume); a call's
    tiles are split into equal batches of at most ``batch_size``. A compiled model specialises
    on shapes, so its batches are zero-padded to ``batch_size``: one shape, compiled once per
    process (each extra shape is a full Inductor compile of the model on the first slide of
    every worker, which costs more than the padded rows). TorchScript pads to a multiple of a
    quarter of ``batch_size`` (at most four shapes; its re-profiling is cheap). Padding depends
    only on the batch, so resume stays exact.

    :meth:`submit` enqueues a block and returns at once on CUDA: tiles are copied into a ring of
    ``inflight`` reused page-locked buffers, copied to the device without blocking, preprocessed
    and run on the runner's own CUDA stream, and the probabilities copied back into a reused
    page-locked output slot that a CUDA event guards. On CPU it computes before returning.
    A CUDA out-of-memory error halves the batch size and retries the block.

    With ``n_probs`` the model's output rows are ``[logits (n_probs) | embedding (D)]``; the
    result rows are then ``[probabilities | embedding]`` (float32), written apart by the writer.
    ``segments`` generalises it for multi-task models: rows ``[logits task 1 | task 2 | ... | rest]``
    get one softmax per segment width (infer.multitask), the rest (embeddings) passes unchanged.
    When ``preprocess`` returns a tuple (multi-view models: ``(views, missing)``), the model is
    called with its items as arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: nn.Module,
        device: torch.device,
        batch_size: int,
        precision: str = "auto",
        *,
        compile: str = "auto",
        inflight: int = 3,
        outputs_in_flight: int = 6,
        n_probs: int | None = None,
        segments: tuple[int, ...] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model, self.compiled = prepared_model(model, self.device, compile)
        # TorchScript's profiling executor re-profiles and re-optimises for every new input shape
        # (measured: ~0.7-1.8 s per new batch size for a ResNet-18 on 2 CPU threads, while a
        # steady batch of 64 takes 0.15 s), so, like compiled models, it gets padded batches.
        self.fixed_shapes = self.compiled or isinstance(model, torch.jit.ScriptModule)
        self.preprocess = preprocess.to(self.device).eval()
        self.batch_size = int(batch_size)
        # the model returns [logits | embedding] (infer.embeddings): softmax on the first n_probs only
        self.n_probs = n_probs
        self.segments = tuple(segments) if segments else ((n_probs,) if n_probs is not None else None)
        self.dtype = autocast_dtype(self.device, precision)
        self._lock = device_lock(self.device)
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self.stream = torch.cuda.Stream(self.device)
            # weights were copied on the default stream; our stream must see them finished
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self.inputs = HostBufferRing(inflight, pin=True)
            self.outputs = HostBufferRing(outputs_in_flight, pin=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _batches(self, n: int) -> Iterator[slice]:
        # Equal batches (300 tiles -> 150 + 150, not 256 + 44): a small remainder batch runs
        # ~20 % slower per tile on CPU. The split depends only on n, so resume stays exact.
        k = -(-n // self.batch_size)
        bounds = [round(i * n / k) for i in range(k + 1)]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            yield slice(start, stop)

    def padded(self, m: int) -> int:
        """Rows a batch of ``m`` tiles is run with (padding only for compiled and TorchScript models)."""
        if not self.fixed_shapes:
            return m
        if self.compiled:
            return max(self.batch_size, m)
        q = max(1, -(-self.batch_size // 4))
        return min(max(self.batch_size, m), -(-m // q) * q)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self._model_probs(self.preprocess(batch))

    def _model_probs(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        with self._autocast():
            logits = self.model(*x) if isinstance(x, tuple) else self.model(x)
        # A row with any NaN/Inf output becomes all NaN here, on the device, so the flag comes back
        # with the probabilities (no extra sync); softmax alone would turn a -Inf logit into a 0.
        finite = torch.isfinite(logits).all(dim=1, keepdim=True)
        if self.segments is None:
            return torch.where(finite, torch.softmax(logits.float(), dim=1), float("nan"))
        parts, start = [], 0
        for n in self.segments:
            parts.append(torch.softmax(logits[:, start:start + n].float(), dim=1))
            start += n
        return torch.where(finite, torch.cat([*parts, logits[:, start:].float()], dim=1), float("nan"))

    @torch.inference_mode()
    def _run_cpu(self, tiles: np.ndarray) -> np.ndarray:
        out = []
        for sl in self._batches(len(tiles)):
            batch = torch.from_numpy(np.ascontiguousarray(tiles[sl]))
            m = len(batch)
            x = self.preprocess(batch)
            if self.padded(m) > m:
                # Padding rows are added to the model's input, after the preprocessing: each tile is
                # preprocessed on its own (the resize and normalisation do not mix rows), so only the
                # model needs the fixed shape, and a block's padding (up to ~half of a small block's
                # rows) costs no resize. Zero rows: deterministic, and their outputs are dropped.
                x = _pad_rows(x, self.padded(m))
            out.append(self._model_probs(x)[:m])
        return torch.cat(out).numpy()

    @torch.inference_mode()
    def _enqueue_cuda(self, tiles: np.ndarray) -> PendingProbs:
        n = len(tiles)
        pending = PendingProbs(n)
        try:
            with torch.cuda.stream(self.stream):
                for sl in self._batches(n):
                    m = sl.stop - sl.start
                    slot, host = self.inputs.acquire((self.padded(m), *tiles.shape[1:]), torch.uint8)
                    copied = None
                    try:
                        np.copyto(host[:m].numpy(), tiles[sl])
                        if len(host) > m:
                            host[m:].zero_()  # deterministic padding rows (their outputs are dropped)
                        batch = host.to(self.device, non_blocking=True)
                        copied = sync_event()
                        copied.record(self.stream)
                    finally:
                        # An error here (OOM allocating the device batch) must not keep the slot:
                        # the retry would wait on it for ever. Without an event the slot is free
                        # at once; the handler below synchronises the stream before any retry.
                        self.inputs.release(slot, copied)
                    self._copy_out(pending, sl, self._forward(batch)[:m])
                pending.event = sync_event()
                pending.event.record(self.stream)
        except BaseException:
            self.stream.synchronize()
            pending.discard()
            raise
        return pending

    def _copy_out(self, pending: PendingProbs, sl: slice, probs: torch.Tensor) -> None:
        """Queue the copy of one batch's probabilities into ``pending``'s pinned host rows ``sl``
        (the host buffer is taken from the output ring at the first batch: then the class count is known)."""
        if pending.host is None:
            pending.slot, pending.host = self.outputs.acquire((pending.n, probs.shape[1]), torch.float32)
            pending.ring = self.outputs
        pending.host[sl].copy_(probs, non_blocking=True)

    def submit(self, tiles: np.ndarray) -> PendingProbs:
        """Start the model on ``tiles`` uint8 (N, H, W, 3); ``.result()`` gives float32 (N, C)."""
        if len(tiles) == 0:
            raise ValueError("BatchRunner called with no tiles")
        while True:
            if self._cuda:
                # wait for a free output slot before taking the device: the writer frees it,
                # and other slides on this device should not wait for our writer
                self.outputs.wait_next()
            try:
                with self._lock:
                    if not self._cuda:
                        return PendingProbs(len(tiles), array=self._run_cpu(tiles))
                    return self._enqueue_cuda(tiles)
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                logger.warning("CUDA out of memory; retrying with batch size %d", self.batch_size)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """``tiles`` uint8 (N, H, W, 3) -> float32 probabilities (N, C), synchronously."""
        return self.submit(tiles).result()


def _pad_rows(x: torch.Tensor | tuple[torch.Tensor, ...], rows: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``x`` (or each tensor of a multi-view input) with zero rows appended up to ``rows``."""
    if isinstance(x, tuple):
        return tuple(_pad_tensor(t, rows) for t in x)
    return _pad_tensor(x, rows)


def _pad_tensor(x: torch.Tensor, rows: int) -> torch.Tensor:
    full = x.new_zeros((rows, *x.shape[1:]))
    full[: len(x)] = x
    return full
