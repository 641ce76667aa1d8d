"""One input, one key, one row: same stems in one folder, links, hard links and copies."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import zarr

from tests.helpers.batch import status_rows
from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cluster import analyze_slides, collect_slides
from wsi_cmaf.infer import InferenceConfig
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.slide.synthetic import write_synthetic_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, reader_threads=1, overlay=False, geojson=False)


@pytest.fixture(scope="module")
def client():
    from wsi_cmaf.cluster.engine import connect

    with connect(cluster="local", workers=1) as c:
        yield c


def test_same_stem_different_extension_are_two_slides(client, tmp_path):
    """b/s.tif and b/s.tiff used to share the key s-<hash>: the second failed with StoreMismatchError
    and status.csv lost the first slide's row."""
    b = tmp_path / "b"
    b.mkdir()
    one = write_synthetic_slide(b / "s.tif", 2400, 2000, 0.5, seed=1).path
    two = write_synthetic_slide(b / "s.tiff", 2800, 2000, 0.5, seed=2).path
    other = tmp_path / "c"
    other.mkdir()
    three = write_synthetic_slide(other / "s.tiff", 2400, 2000, 0.5, seed=3).path
    jobs = collect_slides(tmp_path)
    keys = {j.path.name + "@" + j.path.parent.name: j.key for j in jobs}
    assert len(set(keys.values())) == 3, keys
    assert keys["s.tif@b"].endswith("-tif") and keys["s.tiff@b"].endswith("-tiff")
    assert not keys["s.tiff@c"].endswith("-tiff")  # stem + folder hash suffices there: keys stay as before
    model = resolve_model(DarknessClassifier(), tiny_config())
    res = analyze_slides(tmp_path, tmp_path / "out", model=model, client=client, config=CFG, progress=False)
    assert res.counts == {"done": 3}, res.rows
    rows = status_rows(tmp_path / "out" / "status.csv")
    assert sorted(r["slide"] for r in rows) == sorted(map(str, (one, two, three)))
    shapes = {r["slide"]: np.asarray(zarr.open_group(r["output"], mode="r")["0"]).shape for r in rows}
    assert shapes[str(one)] != shapes[str(two)]  # two stores, each of its own slide


def test_links_and_copies_are_analysed_once_and_reported_under_each_name(client, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    real = write_synthetic_slide(src / "orig.tiff", 2400, 2000, 0.5, seed=5).path
    other = write_synthetic_slide(src / "other.tiff", 2400, 2000, 0.5, seed=6).path  # same size, other pixels
    names = tmp_path / "names"
    names.mkdir()
    (names / "sym.tiff").symlink_to(real)
    os.link(real, names / "hard.tiff")
    shutil.copyfile(real, names / "copy.tiff")
    inputs = [real, other, names / "sym.tiff", names / "hard.tiff", names / "copy.tiff"]
    jobs = collect_slides(inputs)
    assert [j.same_as for j in jobs] == [None, None, "orig", "orig", "orig"]
    model = resolve_model(DarknessClassifier(), tiny_config())
    out = tmp_path / "out"
    res = analyze_slides(inputs, out, model=model, client=client, config=CFG, progress=False)
    rows = status_rows(out / "status.csv")
    assert len(rows) == 5 and sorted(r["slide"] for r in rows) == sorted(map(str, inputs))  # none dropped
    by_key = {r["key"]: r for r in rows}
    assert all(r["status"] == "done" for r in rows), rows
    for alias in ("sym", "hard", "copy"):
        assert by_key[alias]["output"] == by_key["orig"]["output"]
        assert by_key[alias]["note"] == f"same file as {real}; analysed once, as orig"
    assert not (out / "sym").exists() and not (out / "copy").exists()  # analysed once
    assert by_key["other"]["output"] != by_key["orig"]["output"]
    assert res.counts == {"done": 5}
