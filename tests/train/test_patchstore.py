"""Packed Zarr patch store, store/manifest Datasets, chunk-local sampler and build_dataloaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_cmaf.errors import DataError, ManifestError
from wsi_cmaf.train.data.datasets import ChunkShuffleSampler, PatchStoreDataset, build_dataloaders
from wsi_cmaf.train.data.manifest import read_manifest
from wsi_cmaf.train.data.patchstore import PatchStore, build_patch_store, write_patch_store
from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, write_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = SyntheticPatchConfig(n_patients=10, patches_per_patient=30, ratio="70:30", seed=5)
    return write_synthetic_dataset(out, cfg, formats=("png", "zarr"))


def test_store_round_trip_random_order_and_repeats(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 20, 20, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 300)
    pids = np.array([f"p.{i % 7}" for i in range(300)])
    splits = np.array(["train", "val", "test"])[np.arange(300) % 3]
    write_patch_store(tmp_path / "s.zarr", images, labels, pids, splits, chunk_patches=64)
    for in_memory in (False, True):
        store = PatchStore(tmp_path / "s.zarr", in_memory=in_memory)
        idx = np.array([299, 0, 150, 0, 64, 63])
        np.testing.assert_array_equal(store.read(idx), images[idx])
        np.testing.assert_array_equal(store.labels, labels)
        np.testing.assert_array_equal(store.patient_ids, pids)
        np.testing.assert_array_equal(store.indices("val"), np.arange(1, 300, 3))
        assert store.chunk_patches == 64 and store.patch_shape == (20, 20)
        with pytest.raises(IndexError):
            store.read([300])


def test_synthetic_store_matches_its_pngs(synth):
    m = read_manifest(synth["manifest"])
    store = PatchStore(synth["store"])
    assert len(store) == len(m)
    for i in (0, 17, 299):
        np.testing.assert_array_equal(store.read([i])[0], np.asarray(Image.open(m.paths()[i])))
    np.testing.assert_array_equal(store.labels, m.labels())
    np.testing.assert_array_equal(store.patient_ids, m.frame["patient_id"].to_numpy())


def test_build_from_manifest_pads_small_patches_and_lists_corrupt_ones(synth, tmp_path):
    m = read_manifest(synth["manifest"])
    small = np.full((30, 40, 3), 10, np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    m.frame.loc[3, "path"] = str(tmp_path / "small.png")
    build_patch_store(m, tmp_path / "b.zarr", chunk_patches=32)
    got = PatchStore(tmp_path / "b.zarr").read([3])[0]
    assert (got[:30, :40] == 10).all() and (got[30:] == 255).all() and (got[:, 40:] == 255).all()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    m.frame.loc[[5, 9], "path"] = str(tmp_path / "bad.png")
    with pytest.raises(ManifestError) as err:
        build_patch_store(m, tmp_path / "c.zarr")
    assert len(err.value.problems) == 2 and "line 7" in str(err.value) and "line 11" in str(err.value)


def test_not_a_store(tmp_path):
    with pytest.raises(DataError):
        PatchStore(tmp_path / "nothing.zarr")


def test_chunk_shuffle_sampler_is_a_seeded_local_permutation():
    rows = np.arange(1000)
    s = ChunkShuffleSampler(rows, chunk_patches=50, pool_chunks=4, seed=1)
    order = list(s)
    assert sorted(order) == list(range(1000))
    assert order == list(ChunkShuffleSampler(rows, 50, pool_chunks=4, seed=1))
    s.set_epoch(1)
    assert list(s) != order
    for start in range(0, 1000, 200):  # each pool of 4 chunks = 200 consecutive samples
        assert len(set(np.asarray(order[start:start + 200]) // 50)) == 4


@pytest.mark.parametrize("kind", ["store", "manifest"])
def test_build_dataloaders(synth, kind):
    bundle = build_dataloaders(synth[kind], batch_size=32, seed=0, return_index=True)
    x, y, idx = next(iter(bundle.loaders["train"]))
    assert x.shape == (32, 3, 50, 50) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 255 and float(x.max()) > 1  # [0,255], not rescaled
    ds = bundle.datasets["train"]
    assert torch.equal(y, torch.as_tensor(ds.labels[idx.numpy()]))
    sizes = {k: len(v) for k, v in bundle.datasets.items()}
    assert sum(sizes.values()) == 300
    assert bundle.class_counts == {c: int((ds.labels == c).sum()) for c in (0, 1)}
    patients = {k: set(v.patient_ids) for k, v in bundle.datasets.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])


def test_store_and_manifest_loaders_give_the_same_test_data(synth):
    a = build_dataloaders(synth["store"], batch_size=64).loaders["test"]
    b = build_dataloaders(synth["manifest"], batch_size=64).loaders["test"]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_dataloaders_apply_the_imbalance_ratio_to_train_only(synth):
    full = build_dataloaders(synth["store"], batch_size=16)
    bundle = build_dataloaders(synth["store"], batch_size=16, imbalance_ratio="90:10", seed=0)
    c = bundle.class_counts
    assert c[0] == 9 * c[1] and c[1] > 0
    assert bundle.resample_report.after == c
    assert len(bundle.datasets["test"]) == len(full.datasets["test"])
    seen = sum(len(yb) for _, yb in bundle.loaders["train"])
    assert seen == c[0] + c[1]


def test_store_dataset_batched_fetch_equals_single(synth):
    ds = PatchStoreDataset(synth["store"], "train")
    batch = ds.__getitems__([5, 1, 5])
    for (xb, yb), i in zip(batch, [5, 1, 5]):
        xs, ys = ds[i]
        assert torch.equal(xb, xs) and yb == ys
