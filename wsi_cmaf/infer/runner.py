"""Batched, on-device preprocessing and model execution for uint8 tiles."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_cmaf.infer.buffers import HostBufferRing, PendingProbs, sync_event
from wsi_cmaf.infer.prepared import device_key, device_lock, prepared_model  # noqa: F401 (public here too)

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
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    # On CPU bf16 pays only where the hardware computes it (AMX / AVX512-BF16): elsewhere
    # oneDNN emulates it, which is slower than fp32 and still changes the numbers.
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def cuda_has_native_bf16() -> bool:
    """Whether the current CUDA device computes bf16 natively (compute capability 8.0 and newer).

    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (V100, T4), which
    runs slower than fp16 there; training asks the same question (``train.engine.amp``).
    """
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch releases without the argument counted native support only
        return bool(torch.cuda.is_bf16_supported())


def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


#: /proc/cpuinfo flags of x86 CPUs that compute bf16 natively (Sapphire Rapids+, Cooper Lake, Zen 4+)
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix kernels natively (checked at run time, once).

    Both must hold: PyTorch dispatches AVX-512 kernels (``get_cpu_capability``; not when
    ``ATEN_CPU_CAPABILITY`` forces a lower level or on non-x86 CPUs) and the CPU reports AMX-BF16
    or AVX512-BF16. Unknown means no: fp32 is always correct, bf16 is only faster where native.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.upper().startswith("AVX512") and bool(NATIVE_BF16_FLAGS & _cpu_flags())


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
        """PIL-style resize: antialiased bilinear on uint8, rounded to uint8 (WSInfer's pixels).

        On CPU torch's uint8 kernel (channels_last) reproduces PIL's result (measured against
        PIL on slide patches: mean |diff| < 0.01 grey level, max 1) about 10x faster than the
        float path; elsewhere the float matrices are used and rounded the same way.
        """
        x = tiles.permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels_last, no copy
        if x.device.type == "cpu" if uint8_kernel is None else uint8_kernel:
            size = (self.input_size, self.input_size)
            return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).to(torch.float32)
        h, w = x.shape[-2:]
        x = self._matrix(h, x.device) @ x.to(torch.float32) @ self._matrix(w, x.device).T
        return x.round_().clamp_(0.0, 255.0)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``tiles``: uint8 (B, H, W, 3) -> float32 (B, 3, S, S)."""
        if self.interpolation == "pil_bilinear" and self.stain is None and tiles.shape[1:3] != (self.input_size,) * 2:
            return self._pil_bilinear(tiles).sub_(self.mean).div_(self.std)
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
        autocast: str = "auto",
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
        self.dtype = autocast_dtype(self.device, autocast)
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
        x = self.preprocess(batch)
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
            if self.padded(m) > m:  # zero rows: deterministic, and their outputs are dropped
                batch = torch.cat([batch, batch.new_zeros((self.padded(m) - m, *batch.shape[1:]))])
            out.append(self._forward(batch)[:m])
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
                    probs = self._forward(batch)[:m]
                    if pending.ring is None:  # the class count is known after the first batch
                        pending.slot, pending.host = self.outputs.acquire((n, probs.shape[1]), torch.float32)
                        pending.ring = self.outputs
                    pending.host[sl].copy_(probs, non_blocking=True)
                pending.event = sync_event()
                pending.event.record(self.stream)
        except BaseException:
            self.stream.synchronize()
            pending.discard()
            raise
        return pending

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
