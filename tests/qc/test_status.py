"""QC columns of a batch's status.csv: filled by the slide task from the analysis, sortable by µm/px ratio."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from wsi_cmaf.cluster.batch import slide_task
from wsi_cmaf.cluster.inputs import SlideJob
from wsi_cmaf.cluster.status import COLUMNS, QC_COLUMNS, StatusTable
from wsi_cmaf.cluster.worker_model import make_model_ref
from wsi_cmaf.infer import InferenceConfig
from wsi_cmaf.infer.modelspec import resolve_model


@pytest.mark.realdata
def test_status_csv_has_qc_columns_sortable_by_mpp_ratio(real_slide, tmp_path: Path) -> None:
    assert set(QC_COLUMNS) <= set(COLUMNS)
    resolved = resolve_model(None)
    ref = make_model_ref(resolved, None, None, tmp_path)
    cfg = InferenceConfig(progress=False, overlay=False, geojson=False)
    slide = real_slide("svs")
    table = StatusTable(tmp_path / "status.csv")
    # the same 20x slide as scanned (0.499) and mislabelled as 40x (0.25)
    for key, mpp in (("right", None), ("mislabelled", 0.25)):
        row = slide_task(SlideJob(slide, mpp, key, None), str(tmp_path / "out"), ref, cfg)
        assert row["status"] == "done", row
        table.update(key, **{k: v for k, v in row.items() if k != "key"})
    with open(tmp_path / "status.csv", newline="") as fh:
        rows = {r["key"]: r for r in csv.DictReader(fh)}
    right, wrong = rows["right"], rows["mislabelled"]
    assert float(right["mpp"]) == pytest.approx(0.499) and right["mpp_source"] == "vendor"
    assert wrong["mpp_source"] == "override"
    # the estimate is a property of the image: near the true 0.499 whatever the label says
    for r in (right, wrong):
        assert abs(float(r["mpp_estimate"]) / 0.499 - 1) <= 0.25
    assert 0.8 <= float(right["mpp_ratio"]) <= 1.25
    assert float(wrong["mpp_ratio"]) < 0.625  # a factor of 2 below: sorts first
    assert sorted(rows.values(), key=lambda r: float(r["mpp_ratio"]))[0]["key"] == "mislabelled"
    assert float(right["ink_fraction"]) < 0.01 and right["blurred_tiles"] == "0"
    assert "differ by" in wrong["error"]  # the disagreement warning is in the row's messages


def test_batch_csv_mpp_may_be_estimate(tmp_path: Path) -> None:
    from wsi_cmaf.cluster.inputs import _from_csv
    from wsi_cmaf.errors import ConfigError

    (tmp_path / "a.svs").touch()
    (tmp_path / "b.svs").touch()
    (tmp_path / "c.svs").touch()
    good = tmp_path / "good.csv"
    good.write_text("path,mpp\na.svs,Estimate\nb.svs,0.5\nc.svs,\n")
    assert [m for _, m in _from_csv(good)] == ["estimate", 0.5, None]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,mpp\na.svs,guess\n")
    with pytest.raises(ConfigError, match="neither a number of µm/px nor 'estimate'"):
        _from_csv(bad)


@pytest.mark.realdata
def test_batch_slide_with_estimated_mpp(real_slide, tmp_path: Path) -> None:
    """A CSV row's ``estimate`` reaches the analysis: the TCGA slide without µm/px is analysed at its estimate."""
    resolved = resolve_model(None)
    ref = make_model_ref(resolved, None, None, tmp_path)
    cfg = InferenceConfig(progress=False, overlay=False, geojson=False)
    row = slide_task(SlideJob(real_slide("jp2k_svs"), "estimate", "tcga", None), str(tmp_path / "out"), ref, cfg)
    assert row["status"] == "done", row
    assert row["mpp_source"] == "estimated from nuclei"
    # the 48-tile estimate of this slide is 0.872 (benchmarks/README.md); the check's value is the same one
    assert 0.7 <= float(row["mpp"]) <= 1.09 and float(row["mpp_ratio"]) == pytest.approx(1.0)


def test_batch_cli_qc_options_reach_the_config(monkeypatch, tmp_path: Path) -> None:
    """``wsi-cmaf batch --mpp-check off --exclude-blurred --no-qc`` lands in the InferenceConfig it runs with."""
    import argparse

    import wsi_cmaf.cluster as cluster
    from wsi_cmaf.cli import batch

    seen = {}

    class Stop(Exception):
        pass

    def fake(inputs, out, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(cluster, "analyze_slides", fake)
    p = argparse.ArgumentParser()
    p.add_argument("-q", "--quiet", action="store_true")
    batch.add_arguments(p)
    (tmp_path / "s.svs").touch()
    for argv, want in (([], (True, True, False)),
                       (["--mpp-check", "off", "--exclude-blurred", "--no-qc"], (False, False, True))):
        args = p.parse_args([str(tmp_path / "s.svs"), "--out", str(tmp_path / "o"), "--model", "cmaf_net", *argv])
        with pytest.raises(Stop):
            batch.run(args)
        cfg = seen["config"]
        assert (cfg.qc, cfg.mpp_check, cfg.exclude_blurred) == want
        assert seen["slides_per_worker"] == 2
    args = p.parse_args([str(tmp_path / "s.svs"), "--out", str(tmp_path / "o"), "--model", "cmaf_net",
                         "--slides-per-worker", "3"])
    with pytest.raises(Stop):
        batch.run(args)
    assert seen["slides_per_worker"] == 3
