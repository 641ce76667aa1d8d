"""Full disks, read-only outputs, missing permission: named errors, nothing half-done reported as
done, and a store that resumes. Real failures where the machine allows (a small tmpfs for
ENOSPC, a read-only tmpfs for EROFS: both need root), monkeypatched OSErrors otherwise."""

from __future__ import annotations

import errno
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cli import main
from wsi_cmaf.errors import InsufficientSpaceError, OutputWriteError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.store_io import atomic_write_bytes, estimate_store_bytes
from wsi_cmaf.output.verify import verify_store
from wsi_cmaf.slide import write_synthetic_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, overlay=False, geojson=False, stain=None,
                      write_queue=1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("writeerr")
    return write_synthetic_slide(d / "w.svs", width=3072, height=2048, mpp=1.0, tile=256).path


def run(slide: Path, out: Path, cfg: InferenceConfig = CFG):
    return analyze_slide(slide, model=DarknessClassifier(), model_config=tiny_config(), out=out, config=cfg)


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({done.stderr.strip() or done.returncode}); real ENOSPC/EROFS need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_store_size_lower_bound_by_hand() -> None:
    # 10 x 16 tiles, 4 x 4 blocks, 8 blocks to compute, 2 classes, 4 KiB file-system blocks:
    # per block: probabilities (2 * 16 * 4 B / 8 -> one 4 KiB block) + tissue, done, manifest = 16 KiB;
    # pyramid: level 1 max(1, 8 >> 2) = 2, level 2 max(1, 8 >> 4) = 1 chunks, for probabilities
    # and tissue: 6 * 4 KiB; 14 zarr.json documents: 56 KiB
    assert estimate_store_bytes((10, 16), (4, 4), 8, 2) == 8 * 16384 + 6 * 4096 + 14 * 4096 == 212_992
    # larger chunks count their uncompressed size / 8: 3 * 64 * 64 * 4 B / 8 = 6 KiB -> 8 KiB; one
    # block still has one chunk at each of levels 1 and 2, for probabilities and tissue: 4 * 4 KiB
    assert estimate_store_bytes((64, 64), (64, 64), 1, 3) == 8192 + 3 * 4096 + 4 * 4096 + 14 * 4096


def test_too_small_file_system_is_refused_before_inference(slide, tmp_path) -> None:
    with tmpfs(tmp_path / "small", "16k") as small:
        with pytest.raises(InsufficientSpaceError) as info:
            run(slide, small / "o")
        err = info.value
        assert err.need >= 212_992 and err.free <= 16 * 1024 and err.errno == errno.ENOSPC
        assert str(small / "o" / "w.zarr") in str(err) and "needs at least" in str(err) and "is free" in str(err)
        assert not (small / "o" / "w.zarr").exists() and not (small / "o" / "w.zarr.lock").exists()


def test_disk_filling_up_during_blocks_is_a_named_error_and_resumes(slide, tmp_path, monkeypatch) -> None:
    import wsi_cmaf.infer.pipeline as pipeline

    clean = HeatmapStore.open(run(slide, tmp_path / "clean").outputs["store"]).probabilities(0)
    real_save = pipeline.save_inputs

    def save_then_fill(store, inputs):
        real_save(store, inputs)
        with open(store.path.parent / "filler", "wb") as f:  # the disk fills up after the tissue stage
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC

    with tmpfs(tmp_path / "disk", "4m") as disk:
        monkeypatch.setattr(pipeline, "save_inputs", save_then_fill)
        with pytest.raises(OutputWriteError) as info:
            run(slide, disk / "o")
        assert info.value.errno == errno.ENOSPC and "no space left on the device (ENOSPC)" in str(info.value)
        assert "rerun the same command to resume" in str(info.value)
        store = HeatmapStore.open(disk / "o" / "w.zarr")
        assert not store.finalized and verify_store(store.path).ok  # whatever is done is whole
        n_done = int(store.done.sum())
        (disk / "o" / "filler").unlink()
        monkeypatch.setattr(pipeline, "save_inputs", real_save)
        again = run(slide, disk / "o")
        assert again.blocks_computed == again.blocks_total - n_done
        np.testing.assert_array_equal(HeatmapStore.open(again.outputs["store"]).probabilities(0), clean)


def test_blocks_before_a_write_error_stay_done_and_none_after(slide, tmp_path, monkeypatch) -> None:
    clean = HeatmapStore.open(run(slide, tmp_path / "clean").outputs["store"]).probabilities(0)
    real_write = HeatmapStore.write_block
    calls = {"n": 0}
    lock = threading.Lock()

    def third_fails(self, index, *args, **kwargs):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 3:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(self.path / "0"))
        return real_write(self, index, *args, **kwargs)

    monkeypatch.setattr(HeatmapStore, "write_block", third_fails)
    with pytest.raises(OutputWriteError, match=r"disk quota exceeded \(EDQUOT\)") as info:
        run(slide, tmp_path / "o")
    assert info.value.errno == errno.EDQUOT
    store = HeatmapStore.open(tmp_path / "o" / "w.zarr")
    assert int(store.done.sum()) == 2 and calls["n"] == 3  # two written; the writer stopped at the third
    assert verify_store(store.path, deep=True).ok
    monkeypatch.setattr(HeatmapStore, "write_block", real_write)
    again = run(slide, tmp_path / "o")
    assert again.blocks_computed == again.blocks_total - 2 and again.blocks_skipped == 2
    np.testing.assert_array_equal(HeatmapStore.open(again.outputs["store"]).probabilities(0), clean)


def test_read_only_output_is_one_line_and_exit_1(slide, tmp_path, capsys) -> None:
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        rc = main(["analyze", str(slide), "--out", str(ro / "o"), "-q", "--no-overlay"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(lines) == 1, lines
        assert "read-only (EROFS)" in lines[0] and str(ro / "o") in lines[0] and "Traceback" not in lines[0]
        assert "nothing was written yet" in lines[0]


def test_full_disk_while_drawing_the_overlay_fails_the_run_and_keeps_the_store(slide, tmp_path, monkeypatch) -> None:
    import wsi_cmaf.output.overlay as overlay

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(overlay, "write_png", full)
    cfg = InferenceConfig(block_tiles=4, progress=False, batch_size=64, overlay=True, geojson=False, stain=None)
    with pytest.raises(OutputWriteError, match=r"w_overlay\.png: no space left on the device \(ENOSPC\)") as info:
        run(slide, tmp_path / "o", cfg)
    store = HeatmapStore.open(tmp_path / "o" / "w.zarr")
    assert f"the heatmap store {store.path} is complete" in str(info.value)
    assert store.finalized and store.done.any() and verify_store(store.path).ok
    assert not (tmp_path / "o" / "w_overlay.png").exists()


def test_permission_denied_is_named(slide, tmp_path, monkeypatch) -> None:
    import wsi_cmaf.infer.guards as guards

    def denied(store, wait=False):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(store).parent))

    monkeypatch.setattr(guards, "acquire_store_lock", denied)
    with pytest.raises(OutputWriteError, match=r"permission denied \(EACCES\)") as info:
        run(slide, tmp_path / "o")
    assert info.value.path == tmp_path / "o"


def test_atomic_write_leaves_the_old_file_or_the_whole_new_one(tmp_path) -> None:
    with tmpfs(tmp_path / "t", "16k") as t:
        target = t / "summary.json"
        atomic_write_bytes(target, b"old")
        with pytest.raises(OutputWriteError, match="ENOSPC"):
            atomic_write_bytes(target, b"x" * 100_000)
        assert target.read_bytes() == b"old" and sorted(p.name for p in t.iterdir()) == ["summary.json"]
        atomic_write_bytes(target, b"new")
        assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) == "0o644"
