"""Clinical schema and encoding, pinned by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from wsi_cmaf.errors import ConfigError, DataError
from wsi_cmaf.slidelevel.clinical import ClinicalEncoder, ClinicalSchema

SCHEMA = {"variables": [{"name": "grade", "type": "categorical", "categories": ["1", "2", "3"]},
                        {"name": "age", "type": "continuous"}]}


def test_encoding_by_hand():
    train = pd.DataFrame({"grade": ["1", "3", None, "2"], "age": [40.0, 60.0, np.nan, 50.0]})
    enc = ClinicalEncoder(ClinicalSchema.from_dict(SCHEMA)).fit(train)
    # train ages 40, 60, 50 (the missing one is ignored): mean 50, population std sqrt(200/3)
    assert enc.means["age"] == 50.0 and enc.stds["age"] == pytest.approx(np.sqrt(200 / 3))
    assert enc.columns == ["grade=1", "grade=2", "grade=3", "grade:missing", "age", "age:missing"]
    test = pd.DataFrame({"grade": [3, "", "2"], "age": [70.0, None, "NA"]})
    x, present = enc.transform(test)
    s = np.sqrt(200 / 3)
    expected = np.array([[0, 0, 1, 0, 20 / s, 0],     # grade 3 (an int from a CSV reader), age 70
                         [0, 0, 0, 1, 0, 1],          # everything missing
                         [0, 1, 0, 0, 0, 1]], np.float32)  # grade 2, age missing
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    assert present.tolist() == [True, False, True]
    np.testing.assert_array_equal(enc.missing_row(), [0, 0, 0, 1, 0, 1])
    assert [(n, (g.start, g.stop)) for n, g in enc.groups] == [("grade", (0, 4)), ("age", (4, 6))]


def test_statistics_come_from_the_training_table_only():
    enc = ClinicalEncoder(ClinicalSchema.from_dict(SCHEMA)).fit(pd.DataFrame({"age": [10.0, 30.0]}))
    x, _ = enc.transform(pd.DataFrame({"age": [1000.0], "grade": ["1"]}))
    assert x[0, 4] == pytest.approx((1000 - 20) / 10)
    again = ClinicalEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    np.testing.assert_array_equal(again.transform(pd.DataFrame({"age": [1000.0], "grade": ["1"]}))[0], x)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="categories"):
        ClinicalSchema.from_dict({"variables": [{"name": "g", "type": "categorical", "categories": ["a"]}]})
    with pytest.raises(ConfigError, match="type must be"):
        ClinicalSchema.from_dict({"variables": [{"name": "g", "type": "ordinal"}]})
    enc = ClinicalEncoder(ClinicalSchema.from_dict(SCHEMA))
    with pytest.raises(DataError, match="not fitted"):
        enc.transform(pd.DataFrame({"age": [1.0]}))
    enc.fit(pd.DataFrame({"age": [1.0, 2.0]}))
    with pytest.raises(DataError, match="declared categories"):
        enc.transform(pd.DataFrame({"grade": ["4"], "age": [1.0]}))
    with pytest.raises(DataError, match="continuous"):
        enc.transform(pd.DataFrame({"grade": ["1"], "age": ["old"]}))


def test_schema_files_json_and_yaml(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "s.yaml").write_text("variables:\n  - {name: grade, type: categorical, categories: [1, 2, 3]}\n"
                                     "  - {name: age, type: continuous}\n")
    a, b = ClinicalSchema.load(tmp_path / "s.json"), ClinicalSchema.load(tmp_path / "s.yaml")
    assert a == b and a.variables[0].categories == ("1", "2", "3")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not a valid schema"):
        ClinicalSchema.load(tmp_path / "bad.json")
