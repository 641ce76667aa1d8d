"""A store proves it is whole before it is resumed or reported: per-block manifest rows, the
cheap check (chunk files and their sizes), ``--deep`` rereads, and resume recomputing damage."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cli import main
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.verify import verify_store
from wsi_cmaf.slide import write_synthetic_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, overlay=False, geojson=False, stain=None)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("verify")
    return write_synthetic_slide(d / "v.svs", width=3072, height=2048, mpp=1.0, tile=256).path


def run(slide: Path, out: Path):
    return analyze_slide(slide, model=DarknessClassifier(), model_config=tiny_config(), out=out, config=CFG)


def _tissue_block(store: HeatmapStore) -> tuple[int, int]:
    """The first done block with a stored level-0 chunk (one with tissue tiles)."""
    for by, bx in np.argwhere(store.done).tolist():
        if (store.path / store.chunk_keys((by, bx))[0]).exists():
            return by, bx
    raise AssertionError("no block with tissue")


def test_manifest_rows_pin_what_was_written(slide, tmp_path) -> None:
    res = run(slide, tmp_path / "o")
    store = HeatmapStore.open(res.outputs["store"])
    # 3072 x 2048 px at 1 µm/px, 200 µm tiles: 16 x 10 tiles (the 0.36 column is kept, the 0.24 row
    # is not), in blocks of 4 x 4: 3 x 4 blocks; exactly those with tissue tiles are computed
    assert store.grid_shape == (10, 16) and store.done.shape == (3, 4)
    tissue = np.pad(store.tissue(), ((0, 2), (0, 0)))
    np.testing.assert_array_equal(store.done, tissue.reshape(3, 4, 4, 4).any(axis=(1, 3)))
    by, bx = _tissue_block(store)
    assert store.chunk_keys((by, bx)) == [f"0/c/0/{by}/{bx}"]
    row = np.asarray(store._manifest[by, bx])
    rs, cs = store.block_slices((by, bx))
    level0 = store.probabilities(0)[:, rs, cs]
    assert row[1] == int(np.isfinite(level0[0]).sum()) == int(store.tissue()[rs, cs].sum())
    assert row[3] == (zlib.crc32(np.ascontiguousarray(level0).tobytes()) & 0xFFFFFFFF)
    assert row[4] == (store.path / f"0/c/0/{by}/{bx}").stat().st_size > 0
    report = verify_store(store.path, deep=True)
    assert report.ok and report.blocks_done == int(store.done.sum()) and "whole" in report.lines()[0]
    assert main(["verify", str(store.path)]) == 0
    from wsi_cmaf.output.store_lock import acquire_store_lock

    with acquire_store_lock(store.path):  # a run writing the store now is named
        assert f"pid {os.getpid()}" in verify_store(store.path).lines()[-1]
    assert len(verify_store(store.path).lines()) == 1


def test_deleted_chunk_is_reported_and_recomputed_on_resume(slide, tmp_path, capsys) -> None:
    first = run(slide, tmp_path / "o")
    store = HeatmapStore.open(first.outputs["store"])
    want = store.probabilities(0)
    by, bx = _tissue_block(store)
    (store.path / f"0/c/0/{by}/{bx}").unlink()
    report = verify_store(store.path)
    assert [p.index for p in report.problems] == [(by, bx)] and "is missing" in report.problems[0].reason
    capsys.readouterr()
    assert main(["verify", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert f"block ({by}, {bx}): chunk 0/c/0/{by}/{bx} is missing" in out
    again = run(slide, tmp_path / "o")
    assert again.blocks_computed == 1 and again.blocks_skipped == int(store.done.sum()) - 1
    np.testing.assert_array_equal(HeatmapStore.open(again.outputs["store"]).probabilities(0), want)
    assert verify_store(store.path, deep=True).ok


def test_truncated_chunk_is_reported_without_reading_data_and_recomputed(slide, tmp_path) -> None:
    first = run(slide, tmp_path / "o")
    store = HeatmapStore.open(first.outputs["store"])
    want = store.probabilities(0)
    by, bx = _tissue_block(store)
    chunk = store.path / f"0/c/0/{by}/{bx}"
    size = chunk.stat().st_size
    chunk.write_bytes(chunk.read_bytes()[: size // 2])
    (problem,) = verify_store(store.path).problems
    assert problem.index == (by, bx) and f"has {size // 2} bytes, {size} were written" in problem.reason
    (deep,) = verify_store(store.path, deep=True).problems
    assert deep.index == (by, bx)
    again = run(slide, tmp_path / "o")
    assert again.blocks_computed == 1
    np.testing.assert_array_equal(HeatmapStore.open(again.outputs["store"]).probabilities(0), want)


def test_same_size_damage_needs_deep(slide, tmp_path) -> None:
    """A flipped byte keeps the file's size: the cheap check passes, --deep finds it."""
    res = run(slide, tmp_path / "o")
    store = HeatmapStore.open(res.outputs["store"])
    by, bx = _tissue_block(store)
    chunk = store.path / f"0/c/0/{by}/{bx}"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert verify_store(store.path).ok
    (problem,) = verify_store(store.path, deep=True).problems
    assert problem.index == (by, bx) and ("cannot be read" in problem.reason or "CRC-32 differs" in problem.reason)
    assert main(["verify", "--deep", str(store.path)]) == 1


def test_verify_of_a_folder_that_is_no_store_is_a_named_error(tmp_path, capsys) -> None:
    (tmp_path / "x.zarr").mkdir()
    assert main(["verify", str(tmp_path / "x.zarr")]) == 1
    assert "not a wsi-cmaf" in capsys.readouterr().err


def test_a_done_block_whose_manifest_row_was_lost_is_reported_and_recomputed(slide, tmp_path) -> None:
    """The row goes in before the done flag: a done block without one lost its manifest chunk."""
    first = run(slide, tmp_path / "o")
    store = HeatmapStore.open(first.outputs["store"])
    want = store.probabilities(0)
    by, bx = _tissue_block(store)
    (store.path / "wsi_cmaf" / "manifest" / "c" / str(by) / str(bx) / "0").unlink()
    (problem,) = verify_store(store.path).problems
    assert problem.index == (by, bx) and "manifest row is missing" in problem.reason
    again = run(slide, tmp_path / "o")
    assert again.blocks_computed == 1
    np.testing.assert_array_equal(HeatmapStore.open(again.outputs["store"]).probabilities(0), want)
    assert verify_store(store.path, deep=True).ok
