"""Gated attention-MIL pooling: attention weights, padding, hand-computed scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_cmaf.slidelevel.mil import GatedAttentionMIL, pad_bags


def test_pad_bags_layout():
    x, mask = pad_bags([np.ones((2, 3)), 2 * np.ones((4, 3))])
    assert x.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]
    assert float(x[0, 2:].abs().sum()) == 0.0 and float(x[1].sum()) == 24.0
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        pad_bags([np.ones((2, 3)), np.ones((2, 4))])


def test_attention_sums_to_one_and_padding_gets_zero():
    torch.manual_seed(0)
    mil = GatedAttentionMIL(5, hidden=8, attn_dim=4, dropout=0.0).eval()
    bags = [torch.randn(3, 5), torch.randn(7, 5), torch.randn(1, 5)]
    x, mask = pad_bags(bags)
    x[~mask] = 1e3  # garbage in the padding must not matter
    z, a = mil(x, mask)
    assert torch.allclose(a.sum(1), torch.ones(3))
    assert torch.all(a[~mask] == 0.0)
    assert a[2, 0] == 1.0  # a bag of one tile puts all weight on it
    for i, b in enumerate(bags):  # padded batch == each bag on its own
        z_i, a_i = mil(b[None], torch.ones(1, len(b), dtype=torch.bool))
        torch.testing.assert_close(z[i], z_i[0])
        torch.testing.assert_close(a[i, : len(b)], a_i[0])


def test_gated_attention_matches_hand_computation():
    mil = GatedAttentionMIL(2, hidden=2, attn_dim=1, dropout=0.0).eval()
    with torch.no_grad():
        for p in mil.parameters():
            p.zero_()
        mil.embed[0].weight.copy_(torch.eye(2))       # h = relu(x)
        mil.attn_v.weight.copy_(torch.tensor([[1.0, 0.0]]))  # tanh(h_0)
        mil.attn_u.weight.copy_(torch.tensor([[0.0, 1.0]]))  # sigmoid(h_1)
        mil.attn_w.weight.fill_(2.0)
    x = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    with torch.no_grad():
        z, a = mil(x, torch.ones(1, 2, dtype=torch.bool))
    # scores: 2 * tanh(1) * sigmoid(0) and 2 * tanh(0.5) * sigmoid(2)
    s = np.array([2 * np.tanh(1.0) * 0.5, 2 * np.tanh(0.5) / (1 + np.exp(-2.0))])
    w = np.exp(s) / np.exp(s).sum()
    np.testing.assert_allclose(a[0].numpy(), w, rtol=1e-6)
    np.testing.assert_allclose(z[0].numpy(), w[0] * np.array([1.0, 0.0]) + w[1] * np.array([0.5, 2.0]), rtol=1e-6)


def test_standardisation_uses_given_tiles_and_empty_bags_are_refused():
    mil = GatedAttentionMIL(2)
    mil.set_standardisation(np.array([[0.0, 1.0], [2.0, 1.0]]))
    assert mil.feature_mean.tolist() == [1.0, 1.0] and mil.feature_std.tolist() == [1.0, 1.0]  # std 0 -> 1
    with pytest.raises(ValueError, match="at least one tile"):
        mil(torch.zeros(1, 2, 2), torch.zeros(1, 2, dtype=torch.bool))
