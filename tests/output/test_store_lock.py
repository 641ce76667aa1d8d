"""One writer per store: a second process fails at once naming the holder, waits with
``wait_lock``, and takes over the lock a dead writer left behind (with a log line)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.errors import StoreLockedError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.output.store_lock import acquire_store_lock, lock_path, read_lock_record
from wsi_cmaf.slide import write_synthetic_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, overlay=False, geojson=False, stain=None)
ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from wsi_cmaf.output.store_lock import acquire_store_lock
lock = acquire_store_lock(sys.argv[1])
print("locked", flush=True)
if sys.argv[2] == "die":
    import os
    os.kill(os.getpid(), 9)  # dies holding it: the record stays, the kernel drops the flock
time.sleep(float(sys.argv[2]))
lock.release()
"""


def holder(store: Path, hold: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store), hold], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lock")
    return write_synthetic_slide(d / "k.svs", width=2048, height=1536, mpp=1.0, tile=256).path


def run(slide: Path, out: Path, **kw):
    return analyze_slide(slide, model=DarknessClassifier(), model_config=tiny_config(), out=out, config=CFG, **kw)


def test_second_writer_fails_at_once_naming_the_holder(slide, tmp_path) -> None:
    out = tmp_path / "o"
    proc = holder(out / "k.zarr", "60")
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError, match=rf"being written by pid {proc.pid} on host "
                                                   rf"{socket.gethostname()}") as info:
            run(slide, out)
        assert time.monotonic() - t0 < 30 and info.value.holder["pid"] == proc.pid
        assert "--wait-lock" in str(info.value)
        assert not (out / "k.zarr").exists()  # refused before the store was touched
        from wsi_cmaf.cli import main

        assert main(["analyze", str(slide), "--out", str(out), "-q"]) == 1
    finally:
        proc.kill()
        proc.wait()


def test_wait_lock_waits_for_the_holder(slide, tmp_path, caplog) -> None:
    out = tmp_path / "o"
    proc = holder(out / "k.zarr", "2")
    try:
        with caplog.at_level(logging.INFO, logger="wsi_cmaf.output.store_lock"):
            t0 = time.monotonic()
            res = run(slide, out, wait_lock=True)
        assert proc.wait(timeout=30) == 0 and time.monotonic() - t0 >= 1.0
        assert res.blocks_computed == res.blocks_total
        assert any(f"waiting for the writer lock held by pid {proc.pid}" in r.message for r in caplog.records)
        assert not lock_path(out / "k.zarr").exists()  # released: the lock file is gone
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_dead_writer_is_taken_over_with_a_log_line(slide, tmp_path, caplog) -> None:
    out = tmp_path / "o"
    proc = holder(out / "k.zarr", "die")
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert read_lock_record(out / "k.zarr")["pid"] == proc.pid  # the dead writer's record is still there
    with caplog.at_level(logging.WARNING, logger="wsi_cmaf.output.store_lock"):
        res = run(slide, out)
    assert res.blocks_computed == res.blocks_total
    (line,) = [r.message for r in caplog.records if "stale writer lock" in r.message]
    assert f"pid {proc.pid} on host {socket.gethostname()}" in line and "is gone" in line


def test_lock_in_one_process_excludes_another_handle(tmp_path) -> None:
    """Two acquisitions in one process (two slides of a batch on one store) exclude each other too."""
    with acquire_store_lock(tmp_path / "s.zarr"), pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        acquire_store_lock(tmp_path / "s.zarr")
    acquire_store_lock(tmp_path / "s.zarr").release()


def test_file_system_without_locks_warns_and_goes_on(slide, tmp_path, monkeypatch, caplog) -> None:
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="wsi_cmaf.output.store_lock"):
        res = run(slide, tmp_path / "o")
    assert res.blocks_computed == res.blocks_total
    assert any("does not support file locks" in r.message for r in caplog.records)
    assert not lock_path(tmp_path / "o" / "k.zarr").exists()
