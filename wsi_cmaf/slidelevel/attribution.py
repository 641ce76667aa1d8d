"""Per-variable SHAP values of the clinical inputs of a fused prediction.

captum's :class:`~captum.attr.KernelShap` (captum is already a dependency; the ``shap`` package
would add numba and llvmlite for the same estimate). Each clinical *variable* is one feature: its
one-hot/standardised columns and its missing indicator move together (captum ``feature_mask``).
The baseline is the encoding of "every variable missing", so a variable's value is its contribution
to the predicted probability relative to not knowing it; the image part (the slide embedding) is
held fixed. With V variables KernelShap is exact once it sees all 2^V coalitions; the default
sample count covers that for V <= 8.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from wsi_cmaf.slidelevel.clinical import ClinicalEncoder
from wsi_cmaf.slidelevel.fusion import SlideModel


def clinical_shap(model: SlideModel, encoder: ClinicalEncoder, bag: np.ndarray, clin_row: np.ndarray, *,
                  n_samples: int = 256, seed: int = 0) -> pd.Series:
    """SHAP value (change of P(class 1)) of each clinical variable for one patient.

    ``bag`` (N, D) tile embeddings, ``clin_row`` (F,) encoded clinical row. The values sum to
    P(with this row) - P(all clinical missing) (KernelShap's efficiency constraint).
    """
    from captum.attr import KernelShap

    if model.kind == "image":
        raise ValueError("an image-only model has no clinical inputs to attribute")
    model.eval()
    x = torch.as_tensor(np.asarray(bag, np.float32))[None]
    mask = torch.ones(1, x.shape[1], dtype=torch.bool)
    groups = encoder.groups
    feature_mask = torch.zeros(1, encoder.width, dtype=torch.long)
    for k, (_, cols) in enumerate(groups):
        feature_mask[0, cols] = k

    def prob(clin: torch.Tensor) -> torch.Tensor:
        n = clin.shape[0]
        with torch.no_grad():
            logits, _ = model(x.expand(n, -1, -1) if model.mil is not None else None,
                              mask.expand(n, -1) if model.mil is not None else None,
                              clin.float(), torch.ones(n, dtype=torch.bool))
        return torch.sigmoid(logits)

    torch.manual_seed(seed)
    inp = torch.as_tensor(np.asarray(clin_row, np.float32))[None]
    base = torch.as_tensor(encoder.missing_row())[None]
    attr = KernelShap(prob).attribute(inp, baselines=base, feature_mask=feature_mask, n_samples=n_samples,
                                      perturbations_per_eval=64)
    values = [float(attr[0, cols.start]) for _, cols in groups]  # every column of a group has its value
    return pd.Series(values, index=[name for name, _ in groups], name="shap")
