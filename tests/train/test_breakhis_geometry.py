"""A BreakHis-sized image (700 x 460) reaches the model whole, resized, in training and evaluation.

The fixture's periphery is blue and exactly the central 50 x 50 px (rows 205-254, columns
325-374, what a centre crop keeps) is red, so a crop and a whole-image resize differ everywhere.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from wsi_cmaf.errors import ImageGeometryError

W, H = 700, 460
BLUE, RED = (20, 40, 220), (230, 30, 30)


def _breakhis_image() -> np.ndarray:
    arr = np.empty((H, W, 3), np.uint8)
    arr[:] = BLUE
    arr[205:255, 325:375] = RED
    return arr


def _expected(size: int) -> np.ndarray:
    """The whole image resized to size x size by Pillow's bicubic filter, computed independently."""
    return np.array(Image.fromarray(_breakhis_image()).resize((size, size), Image.Resampling.BICUBIC))


def _manifest(tmp_path, n_per_split: int = 2):
    rows = []
    for split in ("train", "val", "test"):
        for k in range(n_per_split):
            name = f"SOB_{'BM'[k % 2]}_A-14-{split}{k}-40-{k:03d}.png"
            Image.fromarray(_breakhis_image()).save(tmp_path / name)
            rows.append({"path": name, "label": k % 2, "patient_id": f"{split}{k}", "split": split,
                         "magnification": 40})
    path = tmp_path / "breakhis.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_whole_image_is_resized_not_cropped(tmp_path) -> None:
    from wsi_cmaf.train.data.datasets import ManifestDataset
    from wsi_cmaf.train.data.manifest import read_manifest

    ds = ManifestDataset(read_manifest(_manifest(tmp_path)), patch_size=50, image_size=64)
    assert ds.geometry == "resize"
    img = ds[0][0].permute(1, 2, 0).numpy()
    assert img.shape == (64, 64, 3)
    np.testing.assert_array_equal(img, _expected(64).astype(np.float32))
    # the corners are the periphery (blue), the red centre is a small blob: 2,500 of 322,000 px
    assert tuple(img[0, 0]) == BLUE and tuple(img[-1, -1]) == BLUE
    red = (img[..., 0] > 128) & (img[..., 2] < 128)
    assert 0 < red.mean() < 0.02


def test_training_loaders_use_the_whole_image(tmp_path) -> None:
    from wsi_cmaf.train.config import DataConfig, ModelSection
    from wsi_cmaf.train.data.setup import build_data

    data = DataConfig(source=str(_manifest(tmp_path)), batch_size=2, micro_batch_size=None)
    bundle = build_data(data, ModelSection(input_size=96, stain_normalization=None), tmp_path, seed=0)
    assert bundle.info["image_geometry"] == "resize"
    for split in ("train", "val", "test"):
        x = next(iter(bundle.loaders[split]))[0]
        assert x.shape == (2, 3, 96, 96)
        np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), _expected(96).astype(np.float32))


def test_evaluate_feeds_the_model_the_whole_image(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`wsi-cmaf evaluate` (evaluate_checkpoint): what reaches the model is the resized whole image,
    normalised by the model's mean/std, with no further resize (it is already at the input size)."""
    from wsi_cmaf.models import ModelConfig, create_model, save_model
    from wsi_cmaf.preprocess import TilePreprocessor
    from wsi_cmaf.train.evaluate import checkpoint as validate

    size = 32
    mc = ModelConfig(architecture="timm:resnet18", num_classes=2, class_names=["benign", "malignant"],
                     input_size=size, stain_normalization=None, weights_note="untrained test model")
    model_dir = save_model(create_model("timm:resnet18", num_classes=2).eval(), mc, tmp_path / "m")
    seen: list[torch.Tensor] = []
    real_load = validate.load_model

    def spying_load(*args, **kwargs):
        model, cfg = real_load(*args, **kwargs)
        model.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach().clone()))
        return model, cfg

    monkeypatch.setattr(validate, "load_model", spying_load)
    validate.evaluate_checkpoint(model_dir, _manifest(tmp_path), split="test", out_dir=tmp_path / "eval",
                                 n_boot=2, progress=False, device="cpu")
    x = torch.cat(seen)
    assert x.shape == (2, 3, size, size)
    pre = TilePreprocessor(size, tuple(mc.mean), tuple(mc.std), "bicubic")
    want = pre(torch.from_numpy(_expected(size))[None].float())
    torch.testing.assert_close(x[0], want[0], atol=1e-5, rtol=0)


def test_tile_geometry_refuses_a_larger_image_instead_of_cropping(tmp_path) -> None:
    from wsi_cmaf.train.data.geometry import load_image

    path = tmp_path / "big.png"
    Image.fromarray(_breakhis_image()).save(path)
    with pytest.raises(ImageGeometryError, match="700x460 px, larger than the model's 50 px tile"):
        load_image(path, 50, geometry="tile")


def test_idc_tiles_keep_their_pixels_and_small_ones_are_padded(tmp_path) -> None:
    """IDC-sized images (50 px, and the smaller edge patches) are not resized: auto picks 'tile'."""
    from wsi_cmaf.train.data.geometry import decide_geometry, load_image

    rng = np.random.default_rng(0)
    full = rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)
    edge = rng.integers(0, 255, (50, 37, 3), dtype=np.uint8)
    Image.fromarray(full).save(tmp_path / "a.png")
    Image.fromarray(edge).save(tmp_path / "b.png")
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    assert decide_geometry(paths, 50) == "tile"
    np.testing.assert_array_equal(load_image(paths[0], 50), full)
    padded = load_image(paths[1], 50)
    np.testing.assert_array_equal(padded[:, :37], edge)
    assert (padded[:, 37:] == 255).all()
    # beside a BreakHis image, the IDC tile is padded to the tile and resized to the same output
    Image.fromarray(_breakhis_image()).save(tmp_path / "c.png")
    assert decide_geometry([*paths, tmp_path / "c.png"], 50) == "resize"
    want = np.array(Image.fromarray(full).resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(load_image(paths[0], 50, geometry="resize", out_size=64), want)
