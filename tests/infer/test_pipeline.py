"""analyze_slide end to end on synthetic slides with a tiny deterministic model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.errors import ModelConfigError, OutputExistsError, SlideNotFoundError, StoreMismatchError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.slide.synthetic import write_synthetic_slide

REPO = Path(__file__).resolve().parents[2]
CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("infer")
    return write_synthetic_slide(d / "s.tiff", 6400, 4800, 0.5, seed=3, tumour=True)


def run(slide_path, out, **kw):
    kw.setdefault("config", CFG)
    return analyze_slide(slide_path, model=DarknessClassifier(), model_config=tiny_config(), out=out, **kw)


def test_end_to_end_outputs_and_counts(slide, tmp_path):
    res = run(slide.path, tmp_path / "o")
    assert res.tiles_total == 16 * 12
    assert 0 < res.tiles_tissue < res.tiles_total
    assert res.tiles_failed == 0 and res.blocks_failed == 0
    assert res.blocks_computed == res.blocks_total > 0
    for key in ("store", "overlay", "geojson", "summary"):
        assert res.outputs[key].exists(), key
    # plain zarr-python, no wsi-cmaf code: OME-NGFF multiscale metadata and a probability array
    root = zarr.open_group(str(res.store), mode="r")
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    level0 = root[ome["multiscales"][0]["datasets"][0]["path"]]
    probs = np.asarray(level0)
    assert probs.shape == (2, 12, 16)
    tissue = np.isfinite(probs[1])
    assert tissue.sum() == res.tiles_tissue
    np.testing.assert_allclose(probs[0][tissue] + probs[1][tissue], 1.0, rtol=1e-5)
    summary = json.loads(res.outputs["summary"].read_text())
    assert summary["tiles_tissue"] == res.tiles_tissue
    assert res.tissue_area_mm2 > 0


def test_heatmap_follows_known_tumour(slide, tmp_path):
    from skimage.transform import resize
    from sklearn.metrics import roc_auc_score

    res = run(slide.path, tmp_path / "o")
    probs = np.asarray(zarr.open_group(str(res.store), mode="r")["0"])[1]
    truth = resize(slide.tumour_mask.astype(float), probs.shape, order=1, anti_aliasing=True) > 0.5
    ok = np.isfinite(probs)
    assert truth[ok].any() and not truth[ok].all()
    assert roc_auc_score(truth[ok], probs[ok]) > 0.8


def test_existing_store_guards(slide, tmp_path):
    out = tmp_path / "o"
    first = run(slide.path, out)
    again = run(slide.path, out)  # resume: nothing left to do
    assert again.blocks_computed == 0 and again.blocks_skipped == first.blocks_total
    with pytest.raises(OutputExistsError):
        run(slide.path, out, resume=False)
    other = tiny_config(class_names=["benign", "tumour"])
    with pytest.raises(StoreMismatchError):
        analyze_slide(slide.path, model=DarknessClassifier(), model_config=other, out=out, config=CFG)
    assert np.isfinite(np.asarray(zarr.open_group(str(first.store), mode="r")["0"])).any()
    redo = run(slide.path, out, overwrite=True, resume=False)
    assert redo.blocks_computed == first.blocks_total


def test_bad_model_fails_before_slide_work(slide, tmp_path):
    with pytest.raises(ModelConfigError):
        analyze_slide(slide.path, model=DarknessClassifier(num_classes=3),
                      model_config=tiny_config(), out=tmp_path / "o", config=CFG)
    assert not (tmp_path / "o").exists()
    with pytest.raises(SlideNotFoundError):
        run(tmp_path / "missing.svs", tmp_path / "o")


def test_blank_slide_gives_empty_result(tmp_path):
    blank = write_synthetic_slide(tmp_path / "blank.tiff", 3200, 2400, 0.5, seed=1, blank=True)
    res = run(blank.path, tmp_path / "o")
    assert res.tiles_tissue == 0 and res.blocks_total == 0
    assert any("no tissue" in w for w in res.warnings)
    probs = np.asarray(zarr.open_group(str(res.store), mode="r")["0"])
    assert np.isnan(probs).all()


def _corrupt_one_tile(path: Path, dims: tuple[int, int]) -> None:
    """Overwrite the JPEG header of one tissue-covered tile of the level of size ``dims`` (w, h)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = next(p for p in tf.pages if (p.imagewidth, p.imagelength) == tuple(dims) and p.is_tiled)
        offsets, counts = page.dataoffsets, page.databytecounts
        # the largest compressed tile is the most textured one: inside tissue
        i = int(np.argmax(counts))
        offset = offsets[i]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * 64)


def test_corrupt_tile_fails_only_its_grid_tiles(slide, tmp_path):
    """A zeroed JPEG tile at the grid's level: the blocks around it are computed, only the grid
    tiles that touch it are NaN, flagged in the store and listed (level-0) in the summary."""
    import shutil

    bad = tmp_path / "bad.tiff"
    shutil.copy(slide.path, bad)
    from wsi_cmaf.slide.reader import open_slide

    with open_slide(bad) as r:
        dims = r.level_dimensions[r.level_for_mpp(4.0)]
    _corrupt_one_tile(bad, dims)
    res = run(bad, tmp_path / "o")
    assert res.blocks_failed == 0 and res.blocks_computed == res.blocks_total
    assert 0 < res.tiles_failed < res.tiles_tissue
    root = zarr.open_group(str(res.store), mode="r")
    probs = np.asarray(root["0"])
    failed = np.asarray(root["wsi_cmaf/failed_tiles"])
    assert np.isfinite(probs).sum() == (res.tiles_tissue - res.tiles_failed) * 2
    assert failed.sum() == res.tiles_failed and np.isnan(probs[:, failed]).all()
    listed = [f for f in res.failed_tiles if f["stage"] == "inference"]
    assert len(listed) == res.tiles_failed and all("Jpeg" in f["reason"] for f in listed)
    summary = json.loads(res.outputs["summary"].read_text())
    assert summary["tiles_failed"] == res.tiles_failed and len(summary["failed_tiles"]) == len(res.failed_tiles)


KILL_SCRIPT = """
import sys
from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.infer import InferenceConfig, analyze_slide
analyze_slide(sys.argv[1], model=DarknessClassifier(delay=float(sys.argv[3])), model_config=tiny_config(),
              out=sys.argv[2], config=InferenceConfig(block_tiles=4, progress=False, batch_size=64,
              prefetch_blocks=1))
"""


def _start_until_two_blocks(slide_path: Path, out: Path) -> tuple[subprocess.Popen, int]:
    """Start the slow analysis in a child process; return once it has stored two blocks (or ended)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(slide_path), str(out), "0.4"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = out / f"{slide_path.stem}.zarr"
    deadline = time.monotonic() + 120
    done_blocks = 0
    while time.monotonic() < deadline and proc.poll() is None and done_blocks < 2:
        time.sleep(0.2)
        try:
            done_blocks = int(np.asarray(zarr.open_group(str(store), mode="r")["wsi_cmaf/done"]).sum())
        except (FileNotFoundError, KeyError, ValueError):
            continue
    return proc, done_blocks


def _assert_resume_completes(slide_path: Path, out: Path, ref) -> None:
    resumed = run(slide_path, out)
    assert resumed.blocks_skipped >= 2 and "tissue" not in resumed.timings  # stored inputs reused
    assert resumed.blocks_computed == ref.blocks_total - resumed.blocks_skipped
    a = np.asarray(zarr.open_group(str(ref.store), mode="r")["0"])
    b = np.asarray(zarr.open_group(str(resumed.store), mode="r")["0"])
    np.testing.assert_array_equal(a, b)  # NaNs in the same places, identical bits elsewhere


def test_resume_after_sigkill_is_bit_identical(slide, tmp_path):
    ref = run(slide.path, tmp_path / "ref")
    out = tmp_path / "killed"
    proc, done_blocks = _start_until_two_blocks(slide.path, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert done_blocks >= 2, proc.stderr.read().decode()[-2000:]
    assert done_blocks < ref.blocks_total, "the run finished before it could be killed"
    _assert_resume_completes(slide.path, out, ref)


def test_cli_analyze_error_is_one_line(tmp_path):
    from wsi_cmaf.cli import main

    proc = subprocess.run([sys.executable, "-m", "wsi_cmaf", "analyze", str(tmp_path / "nope.svs"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    # Log records (INFO/WARNING lines) may precede it; the error itself is one line, no traceback.
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1 and "nope.svs" in lines[0], proc.stderr
    assert main is not None


def test_cli_analyze_keeps_dask_chatter_out(slide, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wsi_cmaf", "analyze", str(slide.path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wsi_cmaf.slide.grid" in proc.stderr  # our INFO lines are there ...
    assert "distributed." not in proc.stderr  # ... distributed's start-up chatter is not


@pytest.mark.parametrize(("tissue_mpp", "reads"), [(2.0, 1), (8.0, 2)])
def test_overlay_reuses_the_tissue_thumbnail_when_fine_enough(slide, tmp_path, monkeypatch, tissue_mpp, reads):
    """A tissue thumbnail at least as fine as the overlay's map is reused; a coarser one is not."""
    from wsi_cmaf.slide import SlideReader, TissueConfig

    calls = []
    original = SlideReader.thumbnail

    def counting(self, mpp):
        calls.append(mpp)
        return original(self, mpp)

    monkeypatch.setattr(SlideReader, "thumbnail", counting)
    res = run(slide.path, tmp_path / "o", tissue=TissueConfig(mpp=tissue_mpp))
    assert res.outputs["overlay"].exists()
    assert len(calls) == reads and calls[0] == tissue_mpp  # 3.2 mm wide: 1,600 px at 2 µm, 400 at 8


def _forget_blocks(store_path: Path, n: int) -> int:
    """Mark the last ``n`` done blocks not done (as if the run had been killed before them)."""
    done = zarr.open_group(str(store_path), mode="r+")["wsi_cmaf/done"]
    flags = np.asarray(done)
    idx = np.argwhere(flags)[-n:]
    for by, bx in idx:
        done[int(by), int(bx)] = False
    return len(idx)


def test_resume_reuses_stored_tissue_grid_and_stain(slide, tmp_path, monkeypatch):
    """A resumed run takes tissue mask, grid and stain fit from the store: no thumbnail, no fit."""
    from wsi_cmaf.infer import pipeline
    from wsi_cmaf.slide import SlideReader

    cfg = InferenceConfig(block_tiles=4, progress=False, batch_size=64, overlay=False, stain="macenko")
    ref = run(slide.path, tmp_path / "ref", config=cfg)
    out = tmp_path / "o"
    first = run(slide.path, out, config=cfg)
    forgotten = _forget_blocks(first.store, 3)
    calls: list[str] = []
    monkeypatch.setattr(SlideReader, "thumbnail", lambda *a, **k: calls.append("thumbnail"))
    monkeypatch.setattr(pipeline, "fit_from_tiles", lambda *a, **k: calls.append("fit"))
    monkeypatch.setattr(pipeline, "fit_from_blocks", lambda *a, **k: calls.append("fit"))
    resumed = run(slide.path, out, config=cfg)
    assert calls == [] and "tissue" not in resumed.timings and "stain_fit" not in resumed.timings
    assert resumed.blocks_computed == forgotten and resumed.blocks_skipped == ref.blocks_total - forgotten
    assert resumed.tissue_area_mm2 == ref.tissue_area_mm2 and resumed.tiles_tissue == ref.tiles_tissue
    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(ref.store), mode="r")["0"]),
                                  np.asarray(zarr.open_group(str(resumed.store), mode="r")["0"]))
    # other tissue settings: the stored mask does not belong to them, the store refuses
    from wsi_cmaf.slide import TissueConfig

    monkeypatch.undo()
    with pytest.raises(StoreMismatchError, match="identity.tissue"):
        run(slide.path, out, config=cfg, tissue=TissueConfig(min_saturation=0.1))


def test_resume_after_sigint_is_bit_identical(slide, tmp_path):
    """Ctrl-C: the run stops, says how to resume, and leaves a store the next run completes."""
    ref = run(slide.path, tmp_path / "ref")
    out = tmp_path / "interrupted"
    proc, done_blocks = _start_until_two_blocks(slide.path, out)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # it must stop by itself, not hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    err = err.decode()
    assert done_blocks >= 2, err[-2000:]
    assert proc.returncode != 0 and "KeyboardInterrupt" in err and "rerun the same call to resume" in err
    _assert_resume_completes(slide.path, out, ref)
