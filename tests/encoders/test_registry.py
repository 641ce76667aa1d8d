"""Encoder registry and loader: architectures built on the meta device, embedding formation,
checkpoints in each entry's layout reloaded exactly, HF key mapping against HF's maths, named errors."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.encoders import hf_reference_cls, random_encoder, random_hf_state, small_spec, timm_to_hf
from wsi_cmaf.encoders import get_encoder, list_encoders
from wsi_cmaf.encoders.build import build_encoder, embedding_dim, parameter_count
from wsi_cmaf.encoders.loader import find_weights, load_encoder
from wsi_cmaf.errors import (
    CheckpointKeyError,
    CheckpointShapeError,
    EncoderError,
    EncoderWeightsNotFoundError,
    UnknownEncoderError,
)


def vit_params(D, depth, hidden, patch, n_pos, reg=0, ls=True, glu=False):
    """Parameters of a pre-norm ViT, counted by hand: patch conv, class/register tokens, positions,
    per block 2 LayerNorms + fused qkv + projection + MLP (+ 2 layer scales), final LayerNorm.
    A packed SwiGLU's fc1 gives ``hidden`` outputs of which fc2 takes half."""
    embed = 3 * patch * patch * D + D
    tokens = (1 + reg) * D + n_pos * D
    mlp = (D * hidden + hidden + (hidden // 2) * D + D) if glu else (D * hidden + hidden + hidden * D + D)
    block = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + mlp + (2 * D if ls else 0)
    return embed + tokens + depth * block + 2 * D


# (width, depth, MLP hidden, patch, positions, registers, layer scale, SwiGLU) from the model cards:
# hidden = int(width * mlp_ratio); positions = patches (+ class and registers unless no_embed_class)
EXPECTED = {
    "uni": (1024, 24, 4096, 16, 197, 0, True, False),
    "uni2-h": (1536, 24, 8192, 14, 256, 8, True, True),
    "virchow": (1280, 32, 6832, 14, 257, 0, True, True),
    "virchow2": (1280, 32, 6832, 14, 261, 4, True, True),
    "h-optimus-0": (1536, 40, 8192, 14, 256, 4, True, True),
    "h-optimus-1": (1536, 40, 8192, 14, 256, 4, True, True),
    "prov-gigapath": (1536, 40, 8192, 16, 197, 0, True, True),
    "phikon": (768, 12, 3072, 16, 197, 0, False, False),
    "phikon-v2": (1024, 24, 4096, 16, 197, 0, True, False),
    "hibou-l": (1024, 24, 4096, 14, 256, 4, True, False),
}
DIMS = {"uni": 1024, "uni2-h": 1536, "virchow": 2560, "virchow2": 2560, "h-optimus-0": 1536, "h-optimus-1": 1536,
        "prov-gigapath": 1536, "phikon": 768, "phikon-v2": 1024, "hibou-l": 1024}


def _published(text: str) -> tuple[float, float]:
    """("681M") -> (681e6, half a unit of its last digit)."""
    m = re.fullmatch(r"([\d.]+)([MB])", text)
    value, unit = m.group(1), 1e6 if m.group(2) == "M" else 1e9
    decimals = len(value.split(".")[1]) if "." in value else 0
    return float(value) * unit, 0.5 * 10 ** -decimals * unit


def test_ten_encoders_are_registered_with_sources_and_licences():
    names = [s.name for s in list_encoders()]
    assert set(EXPECTED) <= set(names) and len(names) >= 10
    for s in list_encoders():
        assert s.sources and s.licence and s.hf_repo and s.mpp == 0.5 and s.input_size == 224


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_encoder_builds_on_meta_with_its_parameter_count_and_dim(name):
    spec = get_encoder(name)
    module = build_encoder(spec, "meta")
    assert all(p.is_meta for p in module.parameters())  # no memory was allocated
    n = parameter_count(module)
    assert n == vit_params(*EXPECTED[name])
    value, half_unit = _published(spec.params)
    assert abs(n - value) <= max(half_unit, 0.02 * value), (n, spec.params)
    assert embedding_dim(module, spec) == spec.dim == DIMS[name]
    if spec.pooling == "cls+mean_patch":  # Virchow: class token ++ mean of patch tokens
        assert module.num_prefix_tokens == 1 + EXPECTED[name][5]


def test_virchow2_embedding_is_class_token_and_mean_of_patch_tokens_without_registers():
    spec = get_encoder("virchow2")
    enc = random_encoder(spec, depth=1)
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        tokens = enc.trunk.forward_features(x)
        emb = enc.embed(x)
        assert torch.equal(enc.forward_features(x), tokens)
        assert torch.equal(enc.forward_head(tokens, pre_logits=True), emb)
    assert tokens.shape[1] == 1 + 4 + 256
    want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1)
    assert emb.shape == (2, 2560) and torch.equal(emb, want)
    assert not torch.allclose(emb, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1))


def _same_outputs(a, b, size=224):
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return torch.equal(a.embed(x), b.embed(x))


def test_uni_timm_checkpoint_reloads_to_identical_outputs(tmp_path):
    spec = get_encoder("uni")
    enc = random_encoder(spec)
    torch.save(enc.trunk.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_encoder("uni", weights=tmp_path)  # a folder holding pytorch_model.bin
    assert loaded.weights_path == tmp_path / "pytorch_model.bin" and len(loaded.weights_sha256) == 64
    assert loaded.dim == 1024 and not loaded.untrained
    assert _same_outputs(enc, loaded.module)


def test_phikon_hf_vit_checkpoint_reloads_to_identical_outputs(tmp_path):
    spec = get_encoder("phikon")
    enc = random_encoder(spec, seed=1)
    save_file(timm_to_hf(enc.trunk.state_dict(), "hf_vit", 12), tmp_path / "model.safetensors")
    loaded = load_encoder("phikon", weights=tmp_path / "model.safetensors")
    assert _same_outputs(enc, loaded.module)


@pytest.mark.slow
@pytest.mark.parametrize("name,n_reg", [("phikon-v2", 0), ("hibou-l", 4)])
def test_vit_l_hf_dinov2_checkpoints_reload_to_identical_outputs(tmp_path, name, n_reg):
    spec = get_encoder(name)
    enc = random_encoder(spec, seed=2)
    save_file(timm_to_hf(enc.trunk.state_dict(), "hf_dinov2", 24, n_reg), tmp_path / "model.safetensors")
    loaded = load_encoder(name, weights=tmp_path)
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():  # folding the class position into cls_token re-associates one sum
        torch.testing.assert_close(loaded.module.embed(x), enc.embed(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,layout,patch,img,n_reg", [
    ("phikon", "hf_vit", 16, 32, 0), ("phikon-v2", "hf_dinov2", 16, 32, 0), ("hibou-l", "hf_dinov2", 14, 28, 4)])
def test_hf_checkpoints_give_the_class_token_hf_computes(tmp_path, name, layout, patch, img, n_reg):
    st = random_hf_state(layout, 64, 2, patch, img, n_reg)
    save_file(st, tmp_path / "model.safetensors")
    loaded = load_encoder(small_spec(name, img), weights=tmp_path / "model.safetensors")
    x = torch.rand(3, 3, img, img, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = hf_reference_cls(st, x, layout, heads=4, depth=2, patch=patch)
        torch.testing.assert_close(loaded.module.embed(x), want, rtol=1e-5, atol=1e-5)


def _small_timm_checkpoint(tmp_path):
    spec = small_spec("uni", 32)
    enc = random_encoder(spec)
    return spec, enc, dict(enc.trunk.state_dict())


def test_a_missing_key_fails_by_name(tmp_path):
    spec, _, state = _small_timm_checkpoint(tmp_path)
    del state["blocks.1.attn.qkv.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointKeyError, match=r"encoder uni: checkpoint .*model\.safetensors.*1 missing key.*"
                                                 r"blocks\.1\.attn\.qkv\.weight") as info:
        load_encoder(spec, weights=tmp_path / "model.safetensors")
    assert info.value.missing == ["blocks.1.attn.qkv.weight"] and info.value.unexpected == []


def test_an_unexpected_key_and_a_wrong_shape_fail_by_name(tmp_path):
    spec, _, state = _small_timm_checkpoint(tmp_path)
    save_file({**state, "blocks.9.extra": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointKeyError, match=r"unexpected key.*blocks\.9\.extra"):
        load_encoder(spec, weights=tmp_path / "extra.safetensors")
    state["pos_embed"] = torch.zeros(1, 17, 64)  # made for another input size
    save_file(state, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointShapeError, match=r"encoder uni: .*pos_embed is \(1, 17, 64\), the encoder needs "
                                                   r"\(1, 5, 64\)"):
        load_encoder(spec, weights=tmp_path / "shape.safetensors")


def test_a_checkpoint_of_another_layout_fails_by_name(tmp_path):
    spec, _, state = _small_timm_checkpoint(tmp_path)
    save_file(state, tmp_path / "model.safetensors")  # timm names where HF ones are expected
    hf = dataclasses.replace(small_spec("phikon", 32))
    with pytest.raises(CheckpointKeyError, match=r"encoder phikon: checkpoint .* no place in a hf_vit"):
        load_encoder(hf, weights=tmp_path / "model.safetensors")


def test_weights_come_from_the_hf_cache_and_never_from_the_network(tmp_path, monkeypatch):
    spec = get_encoder("phikon")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(EncoderWeightsNotFoundError, match=r"phikon: no local weights.*--weights.*--allow-download"):
        find_weights(spec)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderWeightsNotFoundError, match="HF_HUB_OFFLINE"):
        find_weights(spec, allow_download=True)
    snap = tmp_path / "hub" / "models--owkin--phikon" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    (tmp_path / "hub" / "models--owkin--phikon" / "refs").mkdir()
    (tmp_path / "hub" / "models--owkin--phikon" / "refs" / "main").write_text("abc123")
    assert find_weights(spec) == snap / "model.safetensors"
    assert find_weights(spec, tmp_path / "hub" / "models--owkin--phikon") == snap / "model.safetensors"


def test_any_timm_model_with_a_local_file_and_its_head_left_out(tmp_path):
    import timm

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")  # a classifier checkpoint: head.* present
    loaded = load_encoder("timm:vit_tiny_patch16_224", weights=tmp_path / "w.pth")
    assert loaded.dim == 192 and loaded.spec.mpp == 0.5 and loaded.spec.input_size == 224
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert torch.equal(loaded.module.embed(x), want)
    assert loaded.module.num_features == 192
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    torch.save(small.state_dict(), tmp_path / "w32.pth")
    with pytest.raises(CheckpointShapeError, match="pos_embed"):  # made for 32 px, run at 224 px
        load_encoder("timm:vit_tiny_patch16_224", weights=tmp_path / "w32.pth")


def test_unknown_encoders_are_named():
    with pytest.raises(UnknownEncoderError, match="unknown encoder 'unii'.*uni"):
        get_encoder("unii")
    with pytest.raises(UnknownEncoderError, match="timm has no architecture 'not_a_net'"):
        get_encoder("timm:not_a_net")


def test_a_file_backed_encoder_pickles_as_its_path_and_hash(tmp_path):
    import pickle

    spec = small_spec("phikon", 32)
    enc = random_encoder(spec, seed=4)
    save_file(timm_to_hf(enc.trunk.state_dict(), "hf_vit", 2), tmp_path / "model.safetensors")
    loaded = load_encoder(spec, weights=tmp_path)
    blob = pickle.dumps(loaded.module)
    assert len(blob) < 20_000  # the path, the spec and the hash: not the tensors
    assert _same_outputs(pickle.loads(blob), enc, size=32)
    save_file({k: v + 1 for k, v in timm_to_hf(enc.trunk.state_dict(), "hf_vit", 2).items()},
              tmp_path / "model.safetensors")  # the file changed under the run
    with pytest.raises(EncoderError, match="changed since the run started"):
        pickle.loads(blob)
    random = random_encoder(spec)
    assert len(pickle.dumps(random)) > 100_000  # random weights travel as tensors


def test_a_non_finite_embedding_is_a_nan_coverage_logit():
    spec = small_spec("phikon", 32)
    enc = random_encoder(spec)
    tokens = torch.randn(3, 5, 64)  # phikon pools the class token: token 0
    tokens[1, 0, 5] = float("nan")
    tokens[2, 0, 0] = float("inf")
    tokens[0, 3, 0] = float("nan")  # a patch token, which the class-token embedding never reads
    logit = enc.forward_head(tokens)
    assert logit.shape == (3, 1) and logit[0, 0] == 0
    assert torch.isnan(logit[1:]).all()
    assert torch.softmax(logit, dim=1)[0, 0] == 1.0 and torch.isnan(torch.softmax(logit, dim=1)[1:]).all()
