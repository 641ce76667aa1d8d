"""Training multi-view models (issue 17, item 2): patch stores with context views cut from slides,
the missing-view mask and view dropout in the training loop, and the trained model in analyze_slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.multiview import VIEWS, saved_multiview_model
from tests.helpers.train import annotated_slides
from wsi_cmaf.errors import ConfigError, DataError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.models import ModelConfig, create_model, load_model, save_model
from wsi_cmaf.models.multiview import MultiViewNet, ViewBatch
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.slide.views import ViewSpec
from wsi_cmaf.train.config import ModelSection, TrainConfig, merge_dicts
from wsi_cmaf.train.data.augment import AugmentConfig, BatchAugment
from wsi_cmaf.train.data.datasets import PatchStoreDataset, build_dataloaders, collate_views
from wsi_cmaf.train.data.patchstore import PatchStore, write_patch_store
from wsi_cmaf.train.data.setup import BatchPipeline
from wsi_cmaf.train.data.slide_patches import build_slide_patch_store
from wsi_cmaf.train.engine.trainer import train

torch.set_num_threads(1)

TINY = dict(spatial_backbone="test_resnet", mvit_stem_channels=8, mvit_channels=[8, 16, 16, 16, 16],
            mvit_dims=[16, 16, 16], mvit_depths=[1, 1, 1], mvit_heads=2, context_dim=32, num_heads=2,
            bottleneck_dim=8, head_hidden=[16], nystrom_landmarks=16, attention="nystrom")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three 2 x 2 mm synthetic slides (10 x 10 tiles of 200 µm), one per split."""
    return annotated_slides(tmp_path_factory.mktemp("mv_slides"), 200)


@pytest.fixture(scope="module")
def view_store(slides, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mv_store") / "views.zarr"
    build_slide_patch_store(slides, path, context=[ViewSpec(16.0, 50)], positive_min=0.3, negative_max=0.1)
    return path


def test_store_holds_the_tile_and_its_context(view_store, slides, tmp_path):
    store = PatchStore(view_store)
    assert store.views == VIEWS
    rows = np.array([5, 0, 5])
    views, missing = store.read_views(rows)
    assert [v.shape for v in views] == [(3, 50, 50, 3)] * 2 and missing.shape == (3, 2)
    np.testing.assert_array_equal(views[0], store.read(rows))  # view 0 is the patch itself
    np.testing.assert_array_equal(views[1][0], views[1][2])  # repeats come back in order
    _, all_missing = store.read_views(np.arange(len(store)))
    assert not all_missing[:, 0].any()
    # 800 µm of context around a 200 µm tile leaves a 2 mm slide within 300 µm of an edge, so some
    # tiles have it and some do not; where missing, the context is the white fill
    assert 0 < all_missing[:, 1].sum() < len(store)
    ctx, _ = store.read_views(np.flatnonzero(all_missing[:, 1]))
    assert (ctx[1] == 255).all()
    ctx_present, _ = store.read_views(np.flatnonzero(~all_missing[:, 1]))
    assert (ctx_present[1] < 250).any()
    # a single-view reader of the same store sees an ordinary patch store
    plain = PatchStoreDataset(view_store, "train")
    assert plain[0][0].shape == (3, 50, 50)
    # in memory and on disk agree
    mem, mem_missing = PatchStore(view_store, in_memory=True).read_views(rows)
    np.testing.assert_array_equal(mem[1], views[1])
    np.testing.assert_array_equal(mem_missing, missing)


def test_store_writer_names_bad_views(tmp_path):
    imgs = np.zeros((4, 50, 50, 3), np.uint8)
    args = (imgs, np.zeros(4, np.int64), np.array(["p"] * 4), np.array(["train"] * 4))
    ctx = [np.zeros((4, 50, 50, 3), np.uint8)]
    miss = np.zeros((4, 2), bool)
    with pytest.raises(DataError, match="view 0 is the store's own patches"):
        write_patch_store(tmp_path / "a.zarr", *args, views=[{"mpp": 4, "size": 32}, VIEWS[1]],
                          view_images=ctx, view_missing=miss)
    with pytest.raises(DataError, match="view_missing of shape"):
        write_patch_store(tmp_path / "b.zarr", *args, views=VIEWS, view_images=ctx, view_missing=miss[:, :1])
    with pytest.raises(DataError, match="view_images and view_missing go with"):
        write_patch_store(tmp_path / "c.zarr", *args, view_images=ctx, view_missing=miss)
    write_patch_store(tmp_path / "plain.zarr", *args)
    with pytest.raises(DataError, match="no context views"):
        PatchStore(tmp_path / "plain.zarr").read_views([0])
    with pytest.raises(DataError, match="no context views"):
        build_dataloaders(tmp_path / "plain.zarr", views=2)


def test_view_batch_splits_and_moves_with_its_mask():
    vb = ViewBatch([torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2), torch.zeros(5, 3, 4, 4)],
                   torch.tensor([[0, 1]] * 5, dtype=torch.bool))
    parts = vb.tensor_split(2)
    assert [len(p) for p in parts] == [3, 2]
    assert parts[1].views[0][:, 0, 0, 0].tolist() == [3.0, 4.0] and parts[1].views[1].shape == (2, 3, 4, 4)
    moved = vb.to("cpu", dtype=torch.float64)
    assert moved.views[0].dtype == torch.float64 and moved.missing.dtype == torch.bool


def test_every_view_of_a_tile_gets_the_same_augmentation():
    section = ModelSection(input_size=32, stain_normalization=None)
    aug = BatchAugment(AugmentConfig(elastic_p=0.0), seed=3)
    pipe = BatchPipeline(section, aug, None)
    x = torch.rand(6, 3, 50, 50) * 255
    aug.reseed(11)
    out = pipe(ViewBatch([x, x.clone()], torch.zeros(6, 2, dtype=torch.bool)), ["p"] * 6, train=True)
    torch.testing.assert_close(out.views[0], out.views[1], rtol=0, atol=0)
    aug.reseed(11)
    alone = pipe(x, ["p"] * 6, train=True)
    torch.testing.assert_close(out.views[0], alone, rtol=0, atol=0)
    # and the draws are real: another stream gives another batch
    aug.reseed(12)
    assert (pipe(x, ["p"] * 6, train=True) - alone).abs().max() > 1.0


def _config(store: Path, out: Path, **override) -> dict:
    base = {"data": {"source": str(store), "batch_size": 8, "eval_batch_size": 64, "max_steps_per_epoch": 3,
                     "micro_batch_size": 4},
            "model": {"name": "multiview", "kwargs": {"backbone_kwargs": TINY, "view_dropout": 0.5},
                      "input_size": 32},
            "stages": {"epochs": [1, 1, 1]}, "output_dir": str(out), "bootstrap": 20, "log_every": 1,
            "progress_bar": False, "compile": "off", "device": "cpu"}
    return merge_dicts(base, override)


@pytest.fixture(scope="module")
def mv_run(view_store, tmp_path_factory):
    """A three-stage multi-view run with every view mask the model computed recorded."""
    calls: list[tuple[bool, torch.Tensor | None, torch.Tensor]] = []
    original = MultiViewNet.view_mask

    def recording(self, batch, missing, device):
        present = original(self, batch, missing, device)
        calls.append((self.training, None if missing is None else missing.clone(), present.clone()))
        return present

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MultiViewNet, "view_mask", recording)
        result = train(TrainConfig.from_dict(_config(view_store, tmp_path_factory.mktemp("mv_run") / "run")))
    return result, calls


def test_training_uses_the_mask_and_view_dropout(mv_run):
    result, calls = mv_run
    train_calls = [(m, p) for t, m, p in calls if t]
    eval_calls = [(m, p) for t, m, p in calls if not t]
    assert train_calls and eval_calls
    assert all(m is not None for m, _ in train_calls + eval_calls)  # the store's mask reached the model
    missing = torch.cat([m for m, _ in train_calls])
    present = torch.cat([p for _, p in train_calls])
    assert not (present & missing).any()  # a missing view is never embedded
    assert present[:, 0].all()  # the tile itself is never dropped
    available = ~missing[:, 1]
    dropped = available & ~present[:, 1]
    # view dropout at p = 0.5 drops about half of the available context views (binomial bounds)
    n = int(available.sum())
    assert n >= 20 and 0.2 * n < int(dropped.sum()) < 0.8 * n
    # evaluation: no dropout, exactly the store's mask
    for m, p in eval_calls:
        assert torch.equal(p, ~m)
    assert result.test_metrics["n"] > 0


def test_trained_model_records_its_views_and_runs_on_a_slide(mv_run, slides, tmp_path):
    result, _ = mv_run
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["model_kwargs"]["views"] == VIEWS and saved["model_kwargs"]["num_views"] == 2
    model, cfg = load_model(result.model_dir)
    assert isinstance(model, MultiViewNet) and cfg.model_kwargs["views"] == VIEWS
    res = analyze_slide(slides[2].path, model=result.model_dir, out=tmp_path / "run",
                        config=InferenceConfig(progress=False, overlay=False, geojson=False, compile="off",
                                               precision="off"))
    store = HeatmapStore.open(res.store)
    assert store.attrs["views"] == VIEWS
    assert np.isfinite(store.probabilities(0)).sum() == 2 * res.tiles_tissue > 0


def test_training_batches_match_what_inference_computes(view_store, slides, tmp_path):
    """The store -> loader -> batch pipeline path gives the model the inputs analyze_slide gives it."""
    # its scaled head spreads the outputs, so matching tiles by probability is meaningful
    model_dir, model = saved_multiview_model(tmp_path / "model")
    ds = PatchStoreDataset(view_store, "test", views=True)
    batch = collate_views([ds[i] for i in range(len(ds))])
    pipe = BatchPipeline(ModelSection(input_size=32, stain_normalization=None), None, None)
    with torch.inference_mode():
        train_side = torch.softmax(model(pipe(batch[0], ["x"] * len(ds), train=False)), 1)[:, 1].numpy()
    res = analyze_slide(slides[2].path, model=model_dir, out=tmp_path / "run",
                        config=InferenceConfig(progress=False, overlay=False, geojson=False, compile="off",
                                               precision="off", batch_size=64))
    heat = HeatmapStore.open(res.store).probabilities(0)[1]
    heat = heat[np.isfinite(heat)]
    assert np.std(train_side) > 0.01  # teeth: outputs differ from tile to tile
    gap = np.abs(train_side[:, None] - heat[None, :]).min(axis=1)
    assert gap.max() < 1e-4, gap
    # teeth: dropping the context mask (white padding as a present view) breaks the match
    with torch.inference_mode():
        unmasked = ViewBatch(pipe(batch[0], ["x"] * len(ds), train=False).views, torch.zeros_like(batch[0].missing))
        wrong = torch.softmax(model(unmasked), 1)[:, 1].numpy()
    assert np.abs(wrong[:, None] - heat[None, :]).min(axis=1).max() > 1e-3


def test_config_mismatches_are_named(view_store, tmp_path):
    cases = [
        (_config(view_store, tmp_path / "a", model={"kwargs": {"num_views": 3}}), DataError, "takes 3 views"),
        (_config(view_store, tmp_path / "b", model={"kwargs": {"views": [VIEWS[0], {"mpp": 8.0, "size": 50}]}}),
         ConfigError, "differ from the training store's views"),
        (_config(view_store, tmp_path / "c", model={"spacing_um_px": 2.0}), ConfigError, "view 0 is 50 px at 4.0"),
    ]
    for cfg, error, words in cases:
        with pytest.raises(error, match=words):
            train(TrainConfig.from_dict(cfg))
    with pytest.raises(ConfigError, match="model.tasks with 2 views"):
        TrainConfig.from_dict(_config(view_store, tmp_path / "d", model={"tasks": {"malignancy": 2, "subtype": 8}}))


def test_slide_patches_command_builds_a_view_store(slides, tmp_path, capsys):
    from wsi_cmaf.cli import main

    table = tmp_path / "slides.csv"
    table.write_text("slide,split\n" + "".join(f"{s.path},{s.split}\n" for s in slides))
    out = tmp_path / "cli.zarr"
    assert main(["manifest", "slide-patches", str(table), "--out", str(out), "--view", "16:50"]) == 0
    assert "with views 50 px at 16 µm/px" in capsys.readouterr().out
    store = PatchStore(out)
    assert store.views == VIEWS and sorted(set(store.patient_ids)) == sorted(s.path.stem for s in slides)
    # the ground truth saved beside each synthetic slide labelled the tiles
    assert 0 < store.labels.sum() < len(store)
    # a slide without a mask, and a table without a split column, are named
    (tmp_path / "bare.tiff").write_bytes(b"")
    (tmp_path / "bad.csv").write_text("slide,split\nbare.tiff,train\n")
    assert main(["manifest", "slide-patches", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "x.zarr")]) == 1
    assert "bare.tiff: no usable tumour mask" in capsys.readouterr().err
    (tmp_path / "nosplit.csv").write_text("slide\nbare.tiff\n")
    assert main(["manifest", "slide-patches", str(tmp_path / "nosplit.csv"), "--out", str(tmp_path / "y.zarr")]) == 1
    assert "missing column(s) ['split']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse: exit 2 with the expected form
        main(["manifest", "slide-patches", str(table), "--out", str(tmp_path / "z.zarr"), "--view", "16"])
    assert usage.value.code == 2 and "a view is MPP:SIZE" in capsys.readouterr().err


def test_evaluate_reproduces_the_runs_test_metrics(mv_run, view_store, tmp_path):
    from wsi_cmaf.train.evaluate.checkpoint import evaluate_checkpoint

    result, _ = mv_run
    report, _ = evaluate_checkpoint(result.model_dir, view_store, out_dir=tmp_path / "eval", device="cpu",
                                    n_boot=20, progress=False)
    assert report["n"] == result.test_metrics["n"]
    for name in ("auroc", "auprc", "balanced_accuracy"):
        expected = result.test_metrics["metrics"][name]["value"]
        assert report["metrics"][name]["value"] == pytest.approx(expected, abs=1e-9)
    # --compare with a single-view model: it sees view 0 of the same rows (McNemar on paired rows)
    torch.manual_seed(1)
    single_cfg = ModelConfig(architecture="timm:test_resnet", num_classes=2, class_names=["benign", "malignant"],
                             input_size=32, stain_normalization=None, weights_note="test model (random weights)")
    single = save_model(create_model("timm:test_resnet", num_classes=2), single_cfg, tmp_path / "single")
    both, _ = evaluate_checkpoint(result.model_dir, view_store, out_dir=tmp_path / "cmp", device="cpu", n_boot=5,
                                  progress=False, compare=single)
    assert both["mcnemar"]["model_b"] == str(single) and both["n"] == report["n"]
    # a multi-view model needs a store with its views
    plain = tmp_path / "plain.zarr"
    store = PatchStore(view_store)
    rows = np.arange(len(store))
    write_patch_store(plain, store.read(rows), store.labels, store.patient_ids,
                      np.array(["train", "val", "test"])[store.split_codes])
    with pytest.raises(DataError, match="holds no context views"):
        evaluate_checkpoint(result.model_dir, plain, out_dir=tmp_path / "e2", device="cpu", n_boot=5, progress=False)
