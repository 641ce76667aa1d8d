"""Labelled patches cut from annotated (synthetic) slides for training."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.train import annotated_slides
from wsi_cmaf.errors import DataError
from wsi_cmaf.slide import GridConfig
from wsi_cmaf.train.data.patchstore import PatchStore
from wsi_cmaf.train.data.slide_patches import AnnotatedSlide, build_slide_patch_store, slide_patches


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return annotated_slides(tmp_path_factory.mktemp("annotated"), 100)


def test_labels_follow_the_mask(slides):
    item = slides[0]
    x, y = slide_patches(item, GridConfig())
    assert x.shape[1:] == (50, 50, 3) and x.dtype == np.uint8 and len(x) == len(y) > 0
    assert 0 < y.sum() < len(y)
    # Tumour tiles of the synthetic renderer are darker (denser nuclei) than benign ones.
    assert x[y == 1].mean() < x[y == 0].mean()
    # A mask with no tumour labels everything benign; an all-tumour mask everything tumour.
    _, none = slide_patches(AnnotatedSlide(item.path, np.zeros_like(item.mask), item.mask_mpp, "train"), GridConfig())
    _, all_ = slide_patches(AnnotatedSlide(item.path, np.ones_like(item.mask), item.mask_mpp, "train"), GridConfig())
    assert none.sum() == 0 and all_.sum() == len(all_) == len(none)


def test_store_has_one_patient_per_slide_and_slide_level_splits(slides, tmp_path):
    counts = build_slide_patch_store(slides, tmp_path / "store.zarr")
    store = PatchStore(tmp_path / "store.zarr")
    assert len(store) == sum(c["patches"] for c in counts.values())
    pids = store.patient_ids
    assert sorted(set(pids)) == sorted(s.path.stem for s in slides)
    for split, item in zip(("train", "val", "test"), slides):
        rows = store.indices(split)
        assert set(pids[rows]) == {item.path.stem}


def test_bad_split_is_named(slides, tmp_path):
    bad = [AnnotatedSlide(slides[0].path, slides[0].mask, slides[0].mask_mpp, "holdout")]
    with pytest.raises(DataError, match="train/val/test"):
        build_slide_patch_store(bad, tmp_path / "x.zarr")
