"""The block-reader pool of a batch worker process: one in-process dask client, shared by its slides.

A batch worker runs many slides, several at a time. Each slide streams its blocks through the
reader threads of an in-process dask cluster; building and tearing that cluster down for every
slide costs start-up work per slide and leaves the threads idle between slides. Here the pool is
made once per process and thread count, and every slide of the process submits its reads to it:
while one slide opens, masks, fits its stain or exports, the next one's blocks keep decoding.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client

logger = logging.getLogger(__name__)

__all__ = ["reader_client", "shared_reader_pool", "thread_reader_pool", "pools_created", "close_reader_clients"]

_LOCK = threading.Lock()
_THREAD = threading.local()
_CLIENTS: dict[int, Client] = {}
_CREATED = 0
_REGISTERED = False


def reader_client(threads: int) -> Client:
    """This process's in-process reader client with ``threads`` reader threads, made on first use.

    A client that has been closed (or whose cluster went away) is replaced. Raises
    :class:`~wsi_cmaf.errors.ConfigError` for fewer than one thread.
    """
    global _CREATED, _REGISTERED
    if threads < 1:
        from wsi_cmaf.errors import ConfigError

        raise ConfigError(f"reader_threads must be >= 1, got {threads}")
    with _LOCK:
        client = _CLIENTS.get(threads)
        if client is not None and client.status == "running":
            return client
        from wsi_cmaf.cluster.loopback import in_process_client

        # creation is serialised: dask's lazy imports raced between threads starting clients together
        client = _CLIENTS[threads] = in_process_client(threads)
        _CREATED += 1
        if not _REGISTERED:
            atexit.register(close_reader_clients)
            _REGISTERED = True
        logger.debug("reader pool of %d thread(s) started in process %d", threads, os.getpid())
        return client


@contextmanager
def shared_reader_pool(slides_in_flight: int | None = None) -> Iterator[None]:
    """Within this block, analyses on the calling thread read through the process's reader pool.

    ``analyze_slide`` asks :func:`thread_reader_pool` for it instead of starting a pool of its own.
    The pool has ``reader_threads`` threads for each of the process's ``slides_in_flight`` slides
    (default: the enclosing dask worker's thread count, 1 outside a worker), so slides sharing it
    decode on as many threads as they would have alone, and a slide left on its own gets them all.
    The pool is not handed over as ``client=``: inside a dask worker task, ``Client.scatter``
    sends data to the enclosing worker instead of the pool's.
    """
    slots = slides_in_flight if slides_in_flight is not None else _worker_threads()
    before = getattr(_THREAD, "slots", None)
    _THREAD.slots = max(1, int(slots))
    try:
        yield
    finally:
        _THREAD.slots = before


def _worker_threads() -> int:
    from distributed import get_worker

    try:
        return int(get_worker().state.nthreads)
    except ValueError:  # not inside a dask worker task
        return 1


def thread_reader_pool(threads: int) -> Client | None:
    """The process's reader pool when the calling thread is inside :func:`shared_reader_pool`, else None."""
    slots = getattr(_THREAD, "slots", None)
    return reader_client(threads * slots) if slots else None


def pools_created() -> int:
    """How many reader pools this process has started (for tests and diagnostics)."""
    with _LOCK:
        return _CREATED


def close_reader_clients() -> None:
    """Close every reader pool of this process (at exit, or when a test wants a clean slate)."""
    with _LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        try:
            client.close()
        except (OSError, RuntimeError) as exc:  # at interpreter exit the event loop may be gone
            logger.debug("closing a reader pool failed: %s", exc)
