"""Named whole-run training settings: ``preset: paper`` selects the paper's recipe in one line.

A preset is a table of dotted config keys, each with its value and where the value comes from:
``"paper"`` (stated in Ativi et al., Sci Rep 16, 9607 (2026), with the section) or ``"project"``
(the paper is silent and the project chose; the note says why). A training config naming
``preset: paper`` starts from these values, and any key the file sets itself wins.
:func:`preset_table` gives the rows for documentation (MODEL.md "preset: paper").

Sign conventions in the paper preset follow the paper's stated intent where an equation's sign
contradicts its text, for both such terms alike: ``β2·Î(Z_s;Z_t)`` is added because Sec. 3.2
says the term "penalizes redundant information", and the A-CBFL entropy term would be the
confidence penalty ``−λH`` because Sec. 4.4 says it "provides label smoothing". λ itself is 0:
the paper gives no value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wsi_cmaf.errors import ConfigError


@dataclass(frozen=True)
class PresetValue:
    """One setting of a preset: dotted config key, value, ``source`` ("paper"/"project"), why."""

    key: str
    value: Any
    source: str
    note: str


PAPER_PRESET: tuple[PresetValue, ...] = (
    # --- network
    PresetValue("model.name", "cmaf_net", "paper", "Sec. 4: CMAF-Net"),
    PresetValue("model.input_size", 224, "paper", "Sec. 5.1: patches resized to 224x224"),
    PresetValue("model.stain_normalization", "macenko", "paper", "Sec. 5.1: Macenko normalization"),
    PresetValue("model.kwargs.attention", "nystrom", "paper",
                "Sec. 4.2: Nyström approximation in the contextual branch (project default: exact where cheaper)"),
    PresetValue("model.kwargs.nystrom_landmarks", 64, "project", "the paper gives no landmark count"),
    PresetValue("model.kwargs.patch_size", 8, "paper", "Sec. 4.2: 8x8 patches instead of 16x16"),
    PresetValue("model.kwargs.num_heads", 8, "paper", "Sec. 4.3: H = 8 heads (d_h = 60)"),
    PresetValue("model.kwargs.tau_init", "lognormal(0,0.1)", "paper", "Sec. 4.3, 5.3: τ ~ LogNormal(0, 0.1)"),
    # --- data and batches
    PresetValue("data.batch_size", 128, "paper", "Sec. 5.3: batch size 128"),
    PresetValue("data.micro_batch_size", 64, "paper", "Sec. 5.3: 64 per GPU with gradient accumulation"),
    PresetValue("data.augment", True, "paper", "Sec. 4.5: domain-specific augmentation"),
    PresetValue("data.augment_kwargs.rotation_deg", 30.0, "paper", "Sec. 4.5: rotation ±30°"),
    PresetValue("data.augment_kwargs.flips", True, "paper", "Sec. 4.5: flipping"),
    PresetValue("data.augment_kwargs.elastic_p", 0.5, "project",
                "Sec. 4.5 names elastic deformation, not its strength or rate"),
    # --- loss
    PresetValue("loss.loss", "acbfl", "paper", "Sec. 4.4: A-CBFL"),
    PresetValue("loss.loss_kwargs.gamma_base", 2.0, "paper", "Sec. 4.4: γ_base = 2.0"),
    PresetValue("loss.loss_kwargs.alpha_rate", 5.0, "project",
                "Sec. 4.4 says α moves exponentially from inverse frequency to uniform, not at what rate"),
    PresetValue("loss.loss_kwargs.lambda_smooth", 0.0, "project",
                "Eq. 14 gives no λ; 0 avoids capping correct predictions (MODEL.md 'Loss scales')"),
    PresetValue("loss.beta1", 0.01, "paper", "Sec. 5.3: β1 = 0.01"),
    PresetValue("loss.beta2", 0.005, "paper", "Sec. 5.3: β2 = 0.005 (added: the text says it penalizes)"),
    PresetValue("loss.kl_normalization", "sum", "paper", "Eq. 4: the KL summed over the bottleneck dimensions"),
    PresetValue("loss.class_weighted_ib", True, "paper", "Sec. 3.3, Eq. 6: w_1/w_0 = √(π_0/π_1)"),
    PresetValue("loss.diversity_weight", 0.5, "project", "the paper gives no weight; ~5 % of the task gradient"),
    PresetValue("loss.entropy_weight", 0.1, "project", "the paper gives no weight; ~5 % of the task gradient"),
    PresetValue("loss.orthogonality_weight", 0.5, "project", "the paper gives no weight; ~5 % of the task gradient"),
    PresetValue("loss.ramp_shape", "linear", "project", "Sec. 4.5 says 'gradually increasing', not the shape"),
    # --- optimisation
    PresetValue("optim.weight_decay", 1e-4, "paper", "Sec. 5.3: weight decay 1e-4 for non-bias parameters"),
    PresetValue("optim.sam", True, "paper", "Sec. 4.5: Sharpness-Aware Minimization"),
    PresetValue("optim.sam_rho", 0.05, "project", "the paper gives no ρ; Foret et al.'s default"),
    PresetValue("optim.clip", "history", "paper", "Sec. 4.5: clipping based on gradient norm history"),
    PresetValue("optim.clip_history_window", 50, "project", "the paper gives no formula (AutoClip-style)"),
    PresetValue("optim.clip_history_multiplier", 2.0, "project", "the paper gives no formula (AutoClip-style)"),
    PresetValue("precision", "fp16", "paper",
                "Sec. 4.5: FP16 forward passes, FP32 master weights (AMP + loss scaling)"),
    PresetValue("grad_checkpointing", True, "paper", "Sec. 4.5: gradient checkpointing (memory only)"),
    # --- schedule
    PresetValue("stages", {"epochs": [30, 40, 30]}, "paper",
                "Sec. 4.5, 5.3: 30/40/30 epochs at 1e-3 cosine / 1e-4 warm-up + IB ramp / 1e-5 cyclic + dynamic α "
                "(warm-up 10 % of stage 2 and the cycle length stage-3 epochs / 6 are the project's)"),
    PresetValue("early_stopping_patience", 10, "project",
                "Sec. 5.3 stops on validation balanced accuracy; no patience"),
)

PRESETS: dict[str, tuple[PresetValue, ...]] = {"paper": PAPER_PRESET}


def preset_table(name: str) -> tuple[PresetValue, ...]:
    """The rows of a named preset (:data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def preset_dict(name: str) -> dict[str, Any]:
    """A preset as a nested config mapping, ready to be merged under a config file's own keys."""
    out: dict[str, Any] = {}
    for row in preset_table(name):
        *parents, leaf = row.key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = row.value
    return out
