"""Batch-blocked CPU stages (models/blocking.py): same outputs, chunk sizes as documented.

CMAF-Net runs its high-resolution stages in chunks of images in eval mode on the CPU. That is
only allowed because each image's output then does not depend on the chunking, so the blocked
forward must equal the one-pass forward exactly, and the one-pass forward must equal the
branch written out stage by stage.
"""

from __future__ import annotations

import pytest
import torch

from wsi_cmaf.models import create_model
from wsi_cmaf.models.blocking import IMAGES_PER_THREAD_224, cpu_chunk_size
from wsi_cmaf.models.contextual import ContextualBlock
from wsi_cmaf.models.optimize import prepare_for_inference

SMALL = dict(mvit_stem_channels=8, mvit_channels=[16, 16, 24, 24, 32], context_dim=64, num_heads=4,
             bottleneck_dim=8, head_hidden=[16], spatial_backbone="resnet18")
#: transformer widths/depths per patch size (one transformer stage per stride from patch_size to 32)
STAGES = {4: ([32] * 4, [1] * 4), 8: ([32] * 3, [1] * 3), 16: ([32] * 2, [1] * 2), 32: ([32], [1])}


def _model(patch_size: int = 8, **extra: object) -> torch.nn.Module:
    dims, depths = STAGES[patch_size]
    torch.manual_seed(0)
    model = create_model("cmaf_net", patch_size=patch_size, mvit_dims=dims, mvit_depths=depths,
                         **SMALL, **extra)
    return prepare_for_inference(model, torch.device("cpu"))


def _set_chunk(model: torch.nn.Module, k: int | None) -> None:
    model.spatial.cpu_chunk = k
    model.contextual.cpu_chunk = k


def _contextual_by_hand(c: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The contextual branch written out stage by stage (stem, then every down and body in turn)."""
    grads, cache = c.grads(x), {}
    x = c.stem(x)
    for down, body in zip(c.down, c.bodies):
        x = down(x)
        x = body(x, grads, cache) if isinstance(body, ContextualBlock) else body(x)
    return c.final(x)


@pytest.fixture()
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_chunk_size_follows_threads_and_input_area(threads):
    module = torch.nn.Conv2d(3, 3, 1).eval()
    assert IMAGES_PER_THREAD_224 == 2
    threads(2)
    assert cpu_chunk_size(module, torch.zeros(32, 3, 224, 224)) == 4  # 2 per thread x 2 threads
    assert cpu_chunk_size(module, torch.zeros(32, 3, 448, 448)) == 1  # 4 x (224/448)^2 = 1
    # 50 px tiles (the IDC geometry): 4 x 224^2 / 50^2 = 80.3 -> 80 images per chunk
    assert cpu_chunk_size(module, torch.zeros(256, 3, 50, 50)) == 80
    assert cpu_chunk_size(module, torch.zeros(80, 3, 50, 50)) == 0  # batch fits one chunk: one pass
    threads(1)
    assert cpu_chunk_size(module, torch.zeros(32, 3, 224, 224)) == 2
    module.cpu_chunk = 3
    assert cpu_chunk_size(module, torch.zeros(32, 3, 224, 224)) == 3
    module.cpu_chunk = 0
    assert cpu_chunk_size(module, torch.zeros(32, 3, 224, 224)) == 0
    module.cpu_chunk = None
    module.train()  # batch statistics would depend on the chunking
    assert cpu_chunk_size(module, torch.zeros(32, 3, 224, 224)) == 0


@pytest.mark.parametrize("patch_size", [4, 8, 16, 32])
def test_blocked_forward_equals_one_pass_and_the_branch_by_hand(patch_size):
    model = _model(patch_size)
    x = torch.randn(9, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    calls = []
    hook = model.contextual.stem.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.inference_mode():
        _set_chunk(model, 0)
        one_pass = model(x)
        by_hand = _contextual_by_hand(model.contextual, x)
        assert calls == [9, 9]
        calls.clear()
        assert torch.equal(model.contextual(x), by_hand)
        _set_chunk(model, 2)
        blocked = model(x)
        blocked_ctx = model.contextual(x)
    hook.remove()
    assert calls == [9] + [2, 2, 2, 2, 1] * 2  # the one-pass call above, then 5 chunks per forward
    assert torch.equal(blocked, one_pass)
    assert torch.equal(blocked_ctx, by_hand)


def test_blocked_spatial_trunk_equals_timm(threads):
    model = _model()
    x = torch.randn(7, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    seen = []
    hook = model.spatial.trunk.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    with torch.inference_mode():
        reference = model.spatial.trunk(x)  # timm's own FeatureListNet forward
        model.spatial.cpu_chunk = 3
        blocked = model.spatial._trunk(x)
    hook.remove()
    assert seen == [7, 3, 3, 1]
    assert len(blocked) == len(reference) == 4
    for a, b in zip(blocked, reference):
        assert torch.equal(a, b)


def test_training_mode_runs_the_batch_in_one_pass():
    model = _model()
    _set_chunk(model, 2)
    model.train()
    seen = []
    model.contextual.stem.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    model.spatial.trunk.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    model(torch.randn(6, 3, 64, 64))
    assert seen == [6, 6]


def test_blocked_eval_forward_keeps_input_gradients():
    """Explanations (captum) differentiate the eval-mode model: chunking must not change gradients."""
    model = _model()
    x = torch.randn(5, 3, 64, 64)
    grads = []
    for k in (0, 2):
        _set_chunk(model, k)
        xi = x.clone().requires_grad_(True)
        model(xi)[:, 1].sum().backward()
        grads.append(xi.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)
