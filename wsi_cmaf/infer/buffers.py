"""Reused host buffers and pending device results of the streaming loop.

Why a ring and not ``tensor.pin_memory()`` per batch: page-locking memory (``cudaHostAlloc``)
costs more than copying a batch into it, and per-batch allocations make host memory grow with
the number of batches in flight. A :class:`HostBufferRing` owns a fixed number of slots; the
producer takes them round-robin and waits when the slot it needs is still in use, which is also
what bounds the work in flight.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)


def sync_event() -> torch.cuda.Event:
    """A CUDA event for a host thread to wait on: ``blocking=True`` makes ``synchronize()``
    sleep instead of spinning, which matters with several slides in flight (two waiting threads
    each) beside the decoder threads on the same cores."""
    return torch.cuda.Event(blocking=True)


class HostBufferRing:
    """``n`` reusable host buffers (page-locked when ``pin``), handed out round-robin.

    One producer thread calls :meth:`acquire`; any thread calls :meth:`release`. A slot comes
    back into use when it was released *and* the CUDA event given at release (if any) has
    completed, i.e. the device no longer reads it. Buffers grow when a request is larger than a
    slot and are otherwise reused; :attr:`allocations` counts the allocations (tests use it).
    """

    def __init__(self, n: int, *, pin: bool) -> None:
        if n < 1:
            raise ValueError(f"a buffer ring needs at least one slot, got {n}")
        self.pin = pin
        self._buffers: list[torch.Tensor | None] = [None] * n
        self._free = [threading.Event() for _ in range(n)]
        for ev in self._free:
            ev.set()
        self._events: list[torch.cuda.Event | None] = [None] * n
        self._next = 0
        self.allocations = 0

    def __len__(self) -> int:
        return len(self._buffers)

    def wait_next(self, timeout: float | None = None) -> bool:
        """Block until the slot :meth:`acquire` hands out next has been released."""
        return self._free[self._next].wait(timeout)

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        """The next slot's index and a view of its buffer with ``shape`` (contents undefined)."""
        i = self._next
        self._next = (i + 1) % len(self._buffers)
        self._free[i].wait()
        event, self._events[i] = self._events[i], None
        if event is not None:
            event.synchronize()  # the device may still be copying out of this buffer
        need = math.prod(shape)
        buf = self._buffers[i]
        if buf is None or buf.dtype != dtype or buf.numel() < need:
            buf = torch.empty(max(need, 1), dtype=dtype, pin_memory=self.pin)
            self._buffers[i] = buf
            self.allocations += 1
        self._free[i].clear()
        return i, buf[:need].view(shape)

    def release(self, i: int, event: torch.cuda.Event | None = None) -> None:
        """Give slot ``i`` back; with ``event`` it is reused only after that event completed."""
        self._events[i] = event
        self._free[i].set()


@dataclass
class PendingProbs:
    """Probabilities of one block that may still be on their way from the device.

    On CPU they are ready at once (``array`` set). On CUDA they land in an output ring slot
    when ``event`` completes; :meth:`result` waits for it, copies them out and frees the slot.
    """

    n: int
    array: np.ndarray | None = None
    host: torch.Tensor | None = None
    event: torch.cuda.Event | None = None
    ring: HostBufferRing | None = None
    slot: int = -1
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def result(self) -> np.ndarray:
        """float32 (n, C) probabilities (waits for the device-to-host copy)."""
        with self._lock:
            if self.array is None:
                try:
                    if self.event is not None:
                        self.event.synchronize()
                    # without an array the runner filled a host slot (it never submits 0 tiles)
                    assert self.host is not None
                    self.array = self.host[: self.n].numpy().copy()
                finally:
                    self._free_slot()
            return self.array

    def discard(self) -> None:
        """Free the output slot without reading it (the block is not written)."""
        with self._lock:
            if self.array is None and self.ring is not None:
                if self.event is not None:
                    self.event.synchronize()  # the device may still write into the slot
                self._free_slot()

    def _free_slot(self) -> None:
        if self.ring is not None:
            self.ring.release(self.slot)
            self.ring = None
