"""`preset: paper` selects the paper's recipe as published; every value the paper states is pinned here.

The expected values are written by hand from Ativi et al., Sci Rep 16, 9607 (2026)
(`/work/shared/papers/cmaf-net-sci-rep-2026.txt`), never read from the preset module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses import LossConfig
from wsi_cmaf.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]

# dotted key -> the paper's value, with where it says so
PAPER_VALUES = {
    "model.name": "cmaf_net",                       # Sec. 4
    "model.input_size": 224,                        # Sec. 5.1 "resize patches to 224x224"
    "model.stain_normalization": "macenko",         # Sec. 5.1 "Macenko normalization"
    "model.kwargs.attention": "nystrom",            # Sec. 4.2 "Nyström approximation"
    "model.kwargs.patch_size": 8,                   # Sec. 4.2 "8x8 instead of 16x16"
    "model.kwargs.num_heads": 8,                    # Sec. 4.3 "H = 8"
    "model.kwargs.tau_init": "lognormal(0,0.1)",    # Sec. 4.3 / 5.3
    "data.batch_size": 128,                         # Sec. 5.3
    "data.micro_batch_size": 64,                    # Sec. 5.3 "64 per GPU with gradient accumulation"
    "data.augment": True,                           # Sec. 4.5
    "data.augment_kwargs.rotation_deg": 30.0,       # Sec. 4.5 "rotation (±30°)"
    "data.augment_kwargs.flips": True,              # Sec. 4.5 "flipping"
    "loss.loss": "acbfl",                           # Sec. 4.4
    "loss.loss_kwargs.gamma_base": 2.0,             # Sec. 4.4 "γ_base = 2.0"
    "loss.beta1": 0.01,                             # Sec. 5.3
    "loss.beta2": 0.005,                            # Sec. 5.3
    "loss.kl_normalization": "sum",                 # Eq. 4
    "loss.class_weighted_ib": True,                 # Eq. 6
    "optim.weight_decay": 1e-4,                     # Sec. 5.3
    "optim.sam": True,                              # Sec. 4.5
    "optim.clip": "history",                        # Sec. 4.5 "based on gradient norm history"
    "precision": "fp16",                                  # Sec. 4.5 "FP16 ... FP32 master weights"
    "grad_checkpointing": True,                     # Sec. 4.5
}
# Sec. 4.5 / 5.3: (epochs, lr, trainable, loss, ib, dynamic weighting, schedule) per stage
PAPER_STAGES = [
    (30, 1e-3, "branches", "cross_entropy", "off", False, "cosine"),
    (40, 1e-4, "fusion", "objective", "ramp", False, "warmup"),
    (30, 1e-5, "all", "objective", "full", True, "cyclic"),
]


def _get(cfg: TrainConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _paper_config(**extra) -> TrainConfig:
    return TrainConfig.from_dict({"preset": "paper", "data": {"synthetic": {}}, **extra})


def test_paper_preset_sets_every_value_the_paper_states() -> None:
    cfg = _paper_config()
    assert cfg.preset == "paper"
    for key, value in PAPER_VALUES.items():
        assert _get(cfg, key) == value, key
    got = [(s.epochs, s.lr, s.trainable, s.loss, s.ib, s.dynamic_weighting, s.schedule) for s in cfg.stages]
    assert got == PAPER_STAGES
    # the objective's sign conventions: both follow the text (β2 penalises, the entropy term would smooth)
    assert cfg.loss.loss_kwargs["lambda_smooth"] == 0.0


def test_every_paper_row_of_the_table_is_pinned_and_project_rows_are_labelled() -> None:
    from wsi_cmaf.train.presets import preset_table

    rows = preset_table("paper")
    paper_rows = {r.key for r in rows if r.source == "paper"} - {"stages"}
    assert paper_rows == set(PAPER_VALUES)  # a new "paper" value must be pinned above
    assert {r.source for r in rows} == {"paper", "project"}
    assert all(r.note for r in rows)
    # the paper gives no λ, α rate, regulariser weights, SAM ρ or clipping formula: the project's
    project = {r.key for r in rows if r.source == "project"}
    assert {"loss.loss_kwargs.lambda_smooth", "loss.diversity_weight", "loss.entropy_weight",
            "loss.orthogonality_weight", "optim.sam_rho", "optim.clip_history_window"} <= project


def test_the_file_overrides_the_preset_and_the_model_gets_nystrom() -> None:
    from wsi_cmaf.train.engine.trainer import build_model

    tiny = dict(spatial_backbone="test_resnet", mvit_stem_channels=8, mvit_channels=[8, 16, 16, 16, 16],
                mvit_dims=[16, 16, 16], mvit_depths=[1, 1, 1], mvit_heads=2, context_dim=32, num_heads=2,
                bottleneck_dim=8, head_hidden=[16])
    cfg = _paper_config(precision="off", model={"kwargs": tiny})
    assert cfg.precision == "off" and cfg.optim.clip == "history"  # an own key wins, the rest stays
    model = build_model(cfg)
    assert model.config.attention == "nystrom"


def test_loss_preset_paper_equals_the_training_preset_loss() -> None:
    def drop(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in ("ramp_steps", "task_weights")}

    assert drop(_paper_config().loss.to_dict()) == drop(LossConfig.preset("paper").to_dict())


def test_example_paper_config_uses_the_preset() -> None:
    cfg = TrainConfig.from_file(ROOT / "examples" / "train_idc_paper.yaml")
    assert cfg.preset == "paper" and cfg.precision == "fp16" and cfg.model.kwargs["attention"] == "nystrom"


def test_ramp_steps_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="loss.ramp_steps does nothing"):
        TrainConfig.from_dict({"data": {"synthetic": {}}, "loss": {"ramp_steps": 2000}})
    # a saved config round-trips without it
    cfg = _paper_config()
    assert "ramp_steps" not in cfg.to_dict()["loss"]
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown training preset 'papr'"):
        TrainConfig.from_dict({"preset": "papr", "data": {"synthetic": {}}})
