"""Manifest format, validation (every offending row listed), IDC/BreakHis builders, splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wsi_cmaf.cli import main
from wsi_cmaf.errors import ManifestError
from wsi_cmaf.train.data.builders import build_breakhis_manifest, build_idc_manifest
from wsi_cmaf.train.data.manifest import (
    assign_patient_splits,
    parse_breakhis_name,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, write_synthetic_dataset


@pytest.fixture(scope="module")
def idc_tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("idc")
    write_synthetic_dataset(out, SyntheticPatchConfig(n_patients=20, patches_per_patient=6, seed=3))
    return out


def _no_leak(frame: pd.DataFrame) -> None:
    per_patient = frame.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all(), per_patient[per_patient > 1]


def test_idc_builder_parses_names_and_splits_by_patient(idc_tree):
    frame = build_idc_manifest(idc_tree, seed=0)
    files = sorted(idc_tree.glob("*/*/*.png"))
    assert len(frame) == len(files) == 120
    row = frame.iloc[0]
    name = f"{row.patient_id}_idx5_x{row.x}_y{row.y}_class{row.label}.png"
    assert str(row.path).endswith(f"{row.patient_id}/{row.label}/{name}")
    _no_leak(frame)
    patients = frame.groupby("split")["patient_id"].nunique()
    assert patients.sum() == 20 and set(patients.index) == {"train", "val", "test"}
    assert patients["train"] in (13, 14, 15) and patients["test"] in (3, 4, 5)


def test_splits_are_deterministic_and_depend_on_the_seed(idc_tree):
    a = build_idc_manifest(idc_tree, seed=0)
    b = build_idc_manifest(idc_tree, seed=0)
    c = build_idc_manifest(idc_tree, seed=1)
    pd.testing.assert_frame_equal(a, b)
    split_of = lambda f: f.groupby("patient_id")["split"].first()  # noqa: E731
    assert not split_of(a).equals(split_of(c))


def test_assign_patient_splits_fractions_and_input_order_independence():
    strata = {f"p{i:02d}": i % 2 for i in range(40)}
    s1 = assign_patient_splits(strata, seed=5)
    s2 = assign_patient_splits(dict(reversed(list(strata.items()))), seed=5)
    assert s1 == s2
    counts = pd.Series(s1).value_counts()
    assert counts["train"] == 28 and counts["val"] == 4 and counts["test"] == 8
    for label in (0, 1):  # stratified: each stratum is split 70/10/20 on its own
        sub = pd.Series({p: s for p, s in s1.items() if strata[p] == label}).value_counts()
        assert sub["train"] == 14 and sub["val"] == 2 and sub["test"] == 4


def test_small_cohorts_still_fill_every_split():
    s = assign_patient_splits({"a": 0, "b": 0, "c": 0}, seed=0)
    assert sorted(s.values()) == ["test", "train", "val"]


def test_idc_builder_lists_every_bad_file(tmp_path):
    (tmp_path / "123" / "0").mkdir(parents=True)
    (tmp_path / "123" / "1").mkdir(parents=True)
    Image.new("RGB", (50, 50)).save(tmp_path / "123" / "0" / "123_idx5_x0_y0_class0.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "123" / "0" / "oops.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "123" / "1" / "123_idx5_x50_y0_class0.png")
    with pytest.raises(ManifestError) as err:
        build_idc_manifest(tmp_path)
    assert len(err.value.problems) == 2
    assert "oops.png" in str(err.value) and "folder says" in str(err.value)


def _breakhis_tree(root):
    codes = {"A": "B", "F": "B", "PT": "B", "TA": "B", "DC": "M", "LC": "M", "MC": "M", "PC": "M"}
    for k, (sub, cls) in enumerate(codes.items()):
        for p in range(3):
            pid = f"{1000 + 10 * k + p}AB"
            for mag in (40, 400):
                d = root / ("benign" if cls == "B" else "malignant") / f"SOB_{cls}_{sub}_14-{pid}" / f"{mag}X"
                d.mkdir(parents=True, exist_ok=True)
                for seq in (1, 2):
                    Image.new("RGB", (8, 8)).save(d / f"SOB_{cls}_{sub}-14-{pid}-{mag}-{seq:03d}.png")


def test_breakhis_builder(tmp_path):
    _breakhis_tree(tmp_path)
    frame = build_breakhis_manifest(tmp_path, seed=0, relative_to=tmp_path)
    assert len(frame) == 8 * 3 * 2 * 2
    assert set(frame["magnification"]) == {40, 400}
    assert frame["subtype"].nunique() == 8
    assert (frame["label"] == frame["subtype"].isin(
        ["ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma"])).all()
    _no_leak(frame)
    assert set(frame["split"]) == {"train", "val", "test"}
    # stratified by subtype: every subtype has training and test patients
    assert (frame[frame.split == "train"].groupby("subtype")["patient_id"].nunique() >= 1).sum() == 8
    assert frame[frame.split == "test"]["subtype"].nunique() == 8
    write_manifest(frame, tmp_path / "m.csv")
    assert len(read_manifest(tmp_path / "m.csv")) == len(frame)


def test_parse_breakhis_name():
    assert parse_breakhis_name("SOB_B_A-14-22549AB-40-001.png") == {
        "label": 0, "subtype": "adenosis", "patient_id": "14-22549AB", "magnification": 40}
    assert parse_breakhis_name("SOB_M_DC-14-2523-400-014.png")["label"] == 1
    assert parse_breakhis_name("SOB_X_DC-14-2523-400-014.png") is None


def _clean_frame(root, n_per_split=2):
    rows = []
    for split, pid in (("train", "p1"), ("val", "p2"), ("test", "p3")):
        for i in range(n_per_split):
            rel = f"{pid}_{i}.png"
            Image.fromarray(np.full((50, 50, 3), 200, np.uint8)).save(root / rel)
            rows.append({"path": rel, "label": i % 2, "patient_id": pid, "split": split})
    return pd.DataFrame(rows)


def test_validation_lists_all_offending_rows(tmp_path):
    frame = _clean_frame(tmp_path)
    validate_manifest(frame, tmp_path, check_images="decode")  # clean: no error
    (tmp_path / "p1_1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt
    frame.loc[0, "path"] = "missing.png"                                 # missing
    frame.loc[5, "label"] = 7                                            # outside class set
    frame.loc[4, "patient_id"] = "p1"                                    # p1 now in train and test
    frame = frame[frame.split != "val"].reset_index(drop=True)           # empty split
    with pytest.raises(ManifestError) as err:
        validate_manifest(frame, tmp_path, check_images="decode")
    problems = err.value.problems
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "line 2: image not found" in text and "missing.png" in text
    assert "line 3: image cannot be decoded" in text
    assert "line 5: label 7 is not in the class set" in text
    assert "patient 'p1' is in 2 splits" in text and "line 2, line 3, line 4" in text
    assert "split 'val' is empty" in text
    assert str(err.value).count("\n  - ") == 5


def test_exists_mode_does_not_decode(tmp_path):
    frame = _clean_frame(tmp_path)
    (tmp_path / "p1_0.png").write_bytes(b"not a png")
    validate_manifest(frame, tmp_path, check_images="exists")
    with pytest.raises(ManifestError, match="cannot be decoded"):
        validate_manifest(frame, tmp_path, check_images="decode")


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.csv")
    pd.DataFrame({"path": ["a.png"], "label": [0]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ManifestError, match="required column"):
        read_manifest(tmp_path / "m.csv")
    frame = _clean_frame(tmp_path)
    frame.loc[1, "split"] = "training"
    write_manifest(frame, tmp_path / "bad.csv")
    with pytest.raises(ManifestError, match="split 'training' is not one of"):
        read_manifest(tmp_path / "bad.csv")


def test_relative_paths_resolve_against_the_manifest_folder_or_root(tmp_path):
    frame = _clean_frame(tmp_path)
    write_manifest(frame, tmp_path / "sub" / "m.csv")
    with pytest.raises(ManifestError, match="image not found"):
        read_manifest(tmp_path / "sub" / "m.csv")
    m = read_manifest(tmp_path / "sub" / "m.csv", root=tmp_path)
    assert all(p.is_file() for p in m.paths())
    assert m.counts() == {"train": {0: 1, 1: 1}, "val": {0: 1, 1: 1}, "test": {0: 1, 1: 1}}
    assert len(m.split("train")) == 2


def test_cli_idc_validate_and_bad_manifest(idc_tree, tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert main(["manifest", "idc", str(idc_tree), "--out", str(out), "--seed", "2"]) == 0
    assert main(["manifest", "validate", str(out), "--decode"]) == 0
    assert "OK, 120 rows" in capsys.readouterr().out
    frame = pd.read_csv(out)
    frame.loc[[0, 5], "label"] = 3
    frame.to_csv(out, index=False)
    assert main(["manifest", "validate", str(out)]) == 1  # bad data: runtime error (exit 1)
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "line 2:" in err and "line 7:" in err


def test_schema_matches_the_code():
    import json
    from pathlib import Path

    from wsi_cmaf.train.data.manifest import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, SPLITS

    schema = json.loads((Path(__file__).resolve().parents[2] / "data_manifests" / "manifest.schema.json").read_text())
    assert tuple(schema["required"]) == REQUIRED_COLUMNS
    assert set(schema["properties"]) == set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    assert tuple(schema["properties"]["split"]["enum"]) == SPLITS


# --- forgiving builders (issue 13 §5) ----------------------------------------------------
def _idc_messy_tree(root):
    """2 patients x 2 patches, one malformed name, one folder mismatch, a stray text file and a
    nested copy of one patient's folder (as in the common IDC download)."""
    for patient in ("8863", "9000"):
        for cls, x in ((0, 0), (1, 50)):
            d = root / patient / str(cls)
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (50, 50)).save(d / f"{patient}_idx5_x{x}_y0_class{cls}.png")
    Image.new("RGB", (50, 50)).save(root / "8863" / "0" / "8863_idx5_x0_y0_class0 (copy).png")
    Image.new("RGB", (50, 50)).save(root / "9000" / "1" / "9000_idx5_x100_y0_class0.png")  # class 0 in folder 1
    (root / "README.txt").write_text("not a patch")
    nested = root / "IDC_regular_ps50_idx5" / "8863"
    for cls, x in ((0, 0), (1, 50)):
        (nested / str(cls)).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (50, 50)).save(nested / str(cls) / f"8863_idx5_x{x}_y0_class{cls}.png")
    return root


def test_idc_scan_keeps_valid_files_lists_rejects_and_counts_duplicates_once(tmp_path):
    from wsi_cmaf.train.data.builders import scan_idc

    root = _idc_messy_tree(tmp_path / "idc")
    built = scan_idc(root, relative_to=root)
    assert len(built.frame) == 4  # 2 patients x 2 patches; the nested copies are not counted again
    assert sorted(built.frame["path"]) == ["8863/0/8863_idx5_x0_y0_class0.png", "8863/1/8863_idx5_x50_y0_class1.png",
                                           "9000/0/9000_idx5_x0_y0_class0.png", "9000/1/9000_idx5_x50_y0_class1.png"]
    assert built.duplicates == 2
    reasons = dict(zip([p.split("/idc/")[1] for p in built.rejects["path"]], built.rejects["reason"]))
    assert len(reasons) == 4
    assert "does not match" in reasons["8863/0/8863_idx5_x0_y0_class0 (copy).png"]
    assert "folder says patient 9000 class 1" in reasons["9000/1/9000_idx5_x100_y0_class0.png"]
    assert reasons["IDC_regular_ps50_idx5/8863/0/8863_idx5_x0_y0_class0.png"].startswith("duplicate of ")
    assert built.summary() == "idc: 4 images from 2 patients kept, 2 rejected, 2 duplicate(s) counted once"
    with pytest.raises(ManifestError) as err:
        scan_idc(root, strict=True)
    assert len(err.value.problems) == 2  # duplicates are not errors, even in strict mode


def test_cli_manifest_idc_forgiving_and_strict(tmp_path, capsys):
    root = _idc_messy_tree(tmp_path / "idc")
    out = tmp_path / "out" / "idc.csv"
    assert main(["manifest", "idc", str(root), "--out", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("idc: 4 images from 2 patients kept, 2 rejected, 2 duplicate(s) counted once; wrote ")
    assert len(pd.read_csv(out)) == 4
    rejects = pd.read_csv(tmp_path / "out" / "idc_rejects.csv")
    assert list(rejects.columns) == ["path", "reason"] and len(rejects) == 4
    strict_out = tmp_path / "strict.csv"
    assert main(["manifest", "idc", str(root), "--out", str(strict_out), "--strict"]) == 1
    assert not strict_out.exists()
    assert "2 problem(s)" in capsys.readouterr().err


def test_breakhis_scan_rejects_and_duplicates(tmp_path):
    from wsi_cmaf.train.data.builders import scan_breakhis

    _breakhis_tree(tmp_path / "BreaKHis_v1")
    _breakhis_tree(tmp_path / "BreaKHis_v1" / "copy")  # nested duplicate tree: 96 more files
    Image.new("RGB", (8, 8)).save(tmp_path / "BreaKHis_v1" / "SOB_X_A-14-1000AB-40-001.png")  # bad class letter
    Image.new("RGB", (8, 8)).save(tmp_path / "BreaKHis_v1" / "thumbs.png")
    built = scan_breakhis(tmp_path / "BreaKHis_v1")
    assert len(built.frame) == 96 and built.duplicates == 96
    assert len(built.rejects) == 98
    with pytest.raises(ManifestError) as err:
        scan_breakhis(tmp_path / "BreaKHis_v1", strict=True)
    assert len(err.value.problems) == 2 and "thumbs.png" in str(err.value)
