"""train-slide / predict-slide over an encoder's stored embeddings (``--encoder``)."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from tests.helpers.encoders import random_encoder, small_spec
from wsi_cmaf.cli import main
from wsi_cmaf.encoders.embed import embed_slide
from wsi_cmaf.encoders.loader import LoadedEncoder
from wsi_cmaf.errors import DataError, ManifestError
from wsi_cmaf.infer import InferenceConfig
from wsi_cmaf.infer.modelspec import state_dict_sha256
from wsi_cmaf.slide.synthetic import write_synthetic_slide
from wsi_cmaf.slidelevel.data import read_manifest
from wsi_cmaf.slidelevel.train import SlideTrainConfig
from wsi_cmaf.slidelevel.workflows import predict_slide, train_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=32, compile="off", precision="off")


def _enc(seed: int, name: str) -> LoadedEncoder:
    spec = dataclasses.replace(small_spec("phikon", 28, dim=16, depth=1), mpp=4.0, name=name)
    module = random_encoder(spec, seed=seed)
    return LoadedEncoder(module, spec, 16, None, state_dict_sha256(module), "untrained (test)")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("slv")
    a, b = _enc(0, "enc-a"), _enc(1, "enc-b")  # two encoders of the same width
    rows = []
    for i in range(4):
        s = write_synthetic_slide(root / f"p{i}.tiff", 2400, 1600, 0.5, seed=20 + i, tumour=bool(i % 2))
        for enc in (a, b):
            embed_slide(s.path, enc, root / "out", config=CFG)
        rows.append({"store": str(root / "out" / f"p{i}.zarr"), "label": i % 2, "split": "train"})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return root, manifest


def test_manifest_rows_point_at_the_encoder_store_and_keep_the_slide_as_patient(archive):
    root, manifest = archive
    df = read_manifest(manifest, "enc-a")
    assert list(df["patient"]) == ["p0", "p1", "p2", "p3"]
    assert all(s.endswith("/encoders/enc-a") for s in df["store"])
    with pytest.raises(ManifestError, match="no embeddings of encoder 'enc-c'"):
        read_manifest(manifest, "enc-c")


def test_train_and_predict_slide_on_one_encoder_refuse_another(archive, tmp_path):
    root, manifest = archive
    cfg = SlideTrainConfig(epochs=3, batch_size=2)
    metrics = train_slide(manifest, tmp_path / "m", config=cfg, encoder_name="enc-a", write_attention_maps=False)
    assert metrics["n_train"] == 4
    table = predict_slide(tmp_path / "m", manifest, encoder_name="enc-a", write_attention_maps=False)
    assert list(table["patient"]) == ["p0", "p1", "p2", "p3"]
    # same width, other weights: refused by name instead of predicting nonsense
    with pytest.raises(DataError, match="trained on embeddings of encoder:enc-a.*these stores hold encoder:enc-b"):
        predict_slide(tmp_path / "m", manifest, encoder_name="enc-b", write_attention_maps=False)
    assert main(["predict-slide", str(tmp_path / "m"), str(manifest), "--encoder", "enc-a", "--no-attention",
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 4
