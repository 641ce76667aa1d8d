"""Multi-task heads and the missing-label loss (issue 17, item 3), pinned by hand."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_cmaf.errors import DataError, ModelConfigError
from wsi_cmaf.models.heads import TaskHeads, label_present, multitask_loss


def _logits() -> dict[str, torch.Tensor]:
    mal = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]], requires_grad=True)
    sub = torch.zeros(3, 3, requires_grad=True)
    return {"malignancy": mal, "subtype": sub}


def test_masked_loss_by_hand():
    logits = _logits()
    targets = {"malignancy": torch.tensor([1, 0, -1]),  # sample 2 has no malignancy label
               "subtype": torch.tensor([2.0, float("nan"), float("nan")])}  # only sample 0 has a subtype
    total, per = multitask_loss(logits, targets, weights={"subtype": 0.5})
    # malignancy: CE([0,0], 1) = ln 2 = 0.693147; CE([ln 3, 0], 0) = -ln(3/4) = 0.287682; mean of 2
    assert per["malignancy"].item() == pytest.approx((0.693147 + 0.287682) / 2, abs=1e-6)
    # subtype: CE([0,0,0], 2) = ln 3 = 1.098612 over the one labelled sample
    assert per["subtype"].item() == pytest.approx(1.098612, abs=1e-6)
    assert total.item() == pytest.approx(0.490415 + 0.5 * 1.098612, abs=1e-6)
    total.backward()
    # unlabelled samples get no gradient at all
    assert torch.equal(logits["malignancy"].grad[2], torch.zeros(2))
    assert torch.equal(logits["subtype"].grad[1:], torch.zeros(2, 3))
    # labelled ones do: d CE / d logits = (softmax - onehot) / n = ([0.5, 0.5] - [0, 1]) / 2
    assert logits["malignancy"].grad[0].tolist() == pytest.approx([0.25, -0.25], abs=1e-6)


def test_task_without_any_label_contributes_zero_and_no_nan():
    logits = _logits()
    total, per = multitask_loss(logits, {"malignancy": torch.tensor([1, 0, 0]),
                                         "subtype": torch.full((3,), -1)})
    assert per["subtype"].item() == 0.0
    total.backward()
    assert torch.isfinite(logits["subtype"].grad).all() and logits["subtype"].grad.abs().sum() == 0
    # a task absent from the targets is unlabelled for every sample
    _, per = multitask_loss(_logits(), {"malignancy": torch.tensor([1, 0, 0])})
    assert per["subtype"].item() == 0.0


def test_single_tensor_and_errors():
    total, _ = multitask_loss(torch.zeros(2, 2), torch.tensor([0, -1]))
    assert total.item() == pytest.approx(math.log(2.0), abs=1e-6)
    with pytest.raises(DataError, match="no head for"):
        multitask_loss(_logits(), {"grade": torch.tensor([0, 1, 2])})
    with pytest.raises(DataError, match="3 labels for a batch of 2"):
        multitask_loss({"a": torch.zeros(2, 2)}, {"a": torch.tensor([0, 1, 1])})
    assert label_present(torch.tensor([0, -1, 3])).tolist() == [True, False, True]


def test_task_heads_shapes_and_validation():
    heads = TaskHeads(16, {"malignancy": 2, "subtype": 8})
    out = heads(torch.randn(5, 16))
    assert list(out) == ["malignancy", "subtype"]
    assert out["malignancy"].shape == (5, 2) and out["subtype"].shape == (5, 8)
    for bad in ({}, {"x": 0}, {"": 2}, {"x": True}):
        with pytest.raises(ModelConfigError):
            TaskHeads(4, bad)
