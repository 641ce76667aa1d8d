"""The entropy regulariser weighs the CMAF heads uniformly, and training cannot move those weights.

The former learned per-head weights had a degenerate optimum: their logits got gradient from the
regulariser alone (dR/dw_h = s_h (e_h - R)), so minimising R moved all weight to the head whose
attention already had the lowest entropy.
"""

from __future__ import annotations

import math

import torch

from wsi_cmaf.models.cmaf_block import CMAFBlock, attention_entropy


def _block() -> CMAFBlock:
    torch.manual_seed(0)
    return CMAFBlock(spatial_dim=32, dim=48, num_heads=4)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 32, 5, 5, generator=g), torch.randn(2, 48, 5, 5, generator=g)


def test_reg_entropy_is_the_plain_mean_over_heads_by_hand() -> None:
    block = _block().eval()
    f_s, f_t = _inputs()
    aux: dict = {}
    block(f_s, f_t, aux)
    torch.testing.assert_close(aux["entropy_weights"], torch.full((4,), 0.25))
    # by hand: entropy of each attention row, mean per head, divided by log(25 keys), mean over 4 heads
    per_head = attention_entropy(aux["attn"].float()).mean(dim=(0, 2))
    torch.testing.assert_close(aux["reg_entropy"], per_head.sum() / 4 / math.log(25))


def test_minimising_the_regulariser_leaves_the_head_weights_uniform() -> None:
    block = _block().train()
    f_s, f_t = _inputs()
    opt = torch.optim.SGD(block.parameters(), lr=5.0)
    for _ in range(30):
        aux: dict = {}
        block(f_s, f_t, aux)
        opt.zero_grad()
        aux["reg_entropy"].backward()
        opt.step()
    aux = {}
    block(f_s, f_t, aux)
    # learned weights drifted here by up to 0.18 from 1/4, towards the lowest-entropy head
    torch.testing.assert_close(aux["entropy_weights"], torch.full((4,), 0.25))
    assert "entropy_logits" not in dict(block.named_parameters())


def test_a_checkpoint_with_learned_logits_still_loads_and_is_ignored() -> None:
    block = _block()
    state = block.state_dict()
    state["entropy_logits"] = torch.tensor([3.0, -1.0, 0.0, 0.5])  # as a former run saved them
    block.load_state_dict(state, strict=True)
    aux: dict = {}
    block.eval()(*_inputs(), aux)
    torch.testing.assert_close(aux["entropy_weights"], torch.full((4,), 0.25))
