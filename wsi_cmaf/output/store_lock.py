"""One writer per heatmap store: an advisory ``fcntl.flock`` on a lock file beside the store.

``<slide>.zarr.lock`` holds the writer's pid, host and start time while it writes, and is
removed (still locked) when the writer lets go. Beside the store rather than in it: zarr warns
about every file in a group's folder that is not part of the hierarchy.

A lock file that is there but not locked was left by a writer that died (the kernel drops a dead
process's ``flock``); it is taken over with a log line. One that is locked although its holder's
pid is gone on this host (a child process that inherited the descriptor) is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from wsi_cmaf.errors import StoreLockedError

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


def lock_path(store: str | Path) -> Path:
    """The lock file of the store at ``store`` (``<store>.lock``)."""
    store = Path(store)
    return store.with_name(store.name + LOCK_SUFFIX)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read_record(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file ``fd`` has open (not removed or replaced meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _describe(record: dict[str, Any]) -> str:
    if not record:
        return "another process (no record in the lock file yet)"
    return f"pid {record.get('pid')} on host {record.get('host')} (since {record.get('started', '?')})"


def _is_stale(record: dict[str, Any]) -> bool:
    """The holder ran on this host and its pid no longer exists."""
    pid = record.get("pid")
    return (record.get("host") == socket.gethostname() and isinstance(pid, int)
            and pid != os.getpid() and not _pid_alive(pid))


class StoreLock:
    """The held writer lock of one store; :meth:`release` (or leaving the ``with``) lets go."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd  # None: not locked (a file system without locks)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (idempotent). Removing it while still locked
        is safe: a writer waiting on the old file finds it gone after it locks it, and retries."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError as exc:  # a read-only disk must not hide the run's own error
            logger.debug("%s: could not remove the lock file: %s", self.path, exc)
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_store_lock(store: str | Path, *, wait: bool = False, poll_s: float = 0.5,
                       timeout_s: float | None = None) -> StoreLock:
    """Take the writer lock of the store at ``store`` (its parent folder is created if missing).

    Held by another live process: :class:`StoreLockedError` naming the holder at once, or, with
    ``wait``, poll every ``poll_s`` seconds until it is free (``timeout_s``: give up then).
    """
    store = Path(store)
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    announced = replaced = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):  # no locks on this file system
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    logger.warning("%s: the file system does not support file locks (%s); writing without "
                                   "the writer lock: make sure no other run writes this store", store, exc)
                    return StoreLock(path, None)
                raise
            record = _read_record(fd)
            os.close(fd)
            if not replaced and _is_stale(record):
                logger.warning("%s: the writer lock is held although its holder %s is gone; replacing the lock file",
                               store, _describe(record))
                os.unlink(path)
                replaced = True
                continue
            if not wait:
                raise StoreLockedError(
                    f"{store} is being written by {_describe(record)}; wait for that run to finish, pass "
                    "--wait-lock (wait_lock=True) to wait for it, or write to another folder", record) from None
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise StoreLockedError(f"{store}: still locked by {_describe(record)} after {timeout_s:.0f} s",
                                       record) from None
            if not announced:
                logger.info("%s: waiting for the writer lock held by %s", store, _describe(record))
                announced = True
            time.sleep(poll_s)
            continue
        if not _same_file(fd, path):  # released (removed) or replaced while we waited: lock the new one
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            continue
        break
    previous = _read_record(fd)
    if previous:
        how = "is gone" if _is_stale(previous) else "did not release it"
        logger.warning("%s: taking over a stale writer lock: its holder %s %s (that run did not finish)",
                       store, _describe(previous), how)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
    except OSError:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise
    return StoreLock(path, fd)


def read_lock_record(store: str | Path) -> dict[str, Any]:
    """The record in the lock file of the store at ``store`` ({} when there is none)."""
    try:
        fd = os.open(lock_path(store), os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _read_record(fd)
    finally:
        os.close(fd)
