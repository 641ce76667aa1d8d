"""Imbalance protocol: exact ratios, training split only, seeded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wsi_cmaf.errors import ConfigError, DataError
from wsi_cmaf.train.data.imbalance import PAPER_RATIOS, imbalance_sweep, parse_ratio, resample_to_ratio, target_counts


def _frame(n_train=(1400, 600), n_other=(100, 40)):
    rows = []
    for split, (neg, pos) in (("train", n_train), ("val", n_other), ("test", n_other)):
        rows += [{"path": f"{split}_{i}", "label": int(i >= neg), "split": split} for i in range(neg + pos)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("ratio", PAPER_RATIOS)
def test_paper_ratios_are_exact_and_touch_only_train(ratio):
    frame = _frame()
    out, report = resample_to_ratio(frame, ratio, seed=0)
    a, b = parse_ratio(ratio)
    train = out[out.split == "train"]
    n0, n1 = int((train.label == 0).sum()), int((train.label == 1).sum())
    assert n0 * b == n1 * a, (n0, n1)
    assert report.after == {0: n0, 1: n1} and report.before == {0: 1400, 1: 600}
    assert report.dropped == {0: 1400 - n0, 1: 600 - n1}
    assert n0 > 1400 - a  # at most a few majority rows are dropped to make the ratio exact
    for split in ("val", "test"):
        pd.testing.assert_frame_equal(out[out.split == split].reset_index(drop=True),
                                      frame[frame.split == split].reset_index(drop=True))
    assert set(out["path"]) <= set(frame["path"])


def test_counts_for_known_cases():
    assert target_counts(1000, 300, "99:1") == (990, 10)
    assert target_counts(1400, 600, "95:5") == (1387, 73)
    assert target_counts(100, 50, "80:20") == (100, 25)
    assert target_counts(100, 5, "80:20") == (20, 5)  # already more imbalanced: majority is cut
    with pytest.raises(DataError):
        target_counts(50, 0, "99:1")


def test_seeded_and_seed_dependent():
    frame = _frame()
    a, _ = resample_to_ratio(frame, "90:10", seed=1)
    b, _ = resample_to_ratio(frame, "90:10", seed=1)
    c, _ = resample_to_ratio(frame, "90:10", seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert set(a.path) != set(c.path)


def test_original_order_is_kept_and_sweep_runs_every_ratio():
    frame = _frame()
    out, _ = resample_to_ratio(frame, "80:20", seed=0)
    positions = frame.reset_index().set_index("path").loc[out.path, "index"].to_numpy()
    assert np.all(np.diff(positions) > 0)
    sweep = imbalance_sweep(frame, seed=0)
    assert list(sweep) == list(PAPER_RATIOS)
    minority = [r.after[1] for _, r in sweep.values()]
    assert minority == sorted(minority, reverse=True)


def test_bad_input():
    with pytest.raises(ConfigError):
        parse_ratio("95-5")
    with pytest.raises(ConfigError):
        parse_ratio("0:10")
    with pytest.raises(ConfigError):
        resample_to_ratio(pd.DataFrame({"label": [0, 1]}), "80:20")
    out, report = resample_to_ratio(pd.DataFrame({"label": [0] * 8 + [1] * 8}), "80:20", split=None)
    assert report.after == {0: 8, 1: 2} and len(out) == 10
