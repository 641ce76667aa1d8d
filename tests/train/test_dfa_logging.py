"""DFA in training logs, in the Fig. 4 plot and as a Table 6 row (issue 16 item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from wsi_cmaf.train.engine.logging_utils import RunLogger, aux_statistics
from wsi_cmaf.train.paper import protocols as P
from wsi_cmaf.train.paper.report import plot_tau_entropy


def test_aux_statistics_logs_dfa_per_class_by_hand() -> None:
    aux = {"dfa_bias": torch.tensor([[1.0, -2.0], [3.0, 0.0]]),  # (H=2, C=2): head means (2.0, -1.0)
           "dfa_class_mass": torch.tensor([0.25, 0.75])}
    stats = aux_statistics(aux)
    assert stats == {"dfa_bias/0": 2.0, "dfa_bias/1": -1.0, "dfa_mass/0": 0.25, "dfa_mass/1": 0.75}


def test_a_dfa_model_forward_feeds_the_log() -> None:
    from wsi_cmaf.models.cmaf_net import CMAFNet
    from wsi_cmaf.models.config import CMAFConfig
    from wsi_cmaf.train.paper.controlled_config import TINY_CMAF

    torch.manual_seed(0)
    net = CMAFNet(CMAFConfig(**TINY_CMAF, dfa=True, dfa_class_counts=(90.0, 10.0)), num_classes=2)
    _, aux = net.forward_with_aux(torch.randn(2, 3, 48, 48))
    stats = aux_statistics(aux)
    # the bias starts at the log-frequency prior log(0.9), log(0.1) in every head
    assert stats["dfa_bias/0"] == pytest.approx(torch.log(torch.tensor(0.9)).item(), abs=1e-6)
    assert stats["dfa_bias/1"] == pytest.approx(torch.log(torch.tensor(0.1)).item(), abs=1e-6)
    assert {"dfa_mass/0", "dfa_mass/1"} <= set(stats)


def test_fig4_gains_dfa_panels(tmp_path: Path) -> None:
    for name, dfa in (("plain", False), ("dfa", True)):
        log = RunLogger(tmp_path / name)
        for step in range(0, 30, 5):
            row = {"epoch": 1, "step": step, "tau/0": 1.0, "tau/1": 1.1, "attn_entropy/0": 1.5, "attn_entropy/1": 1.4}
            if dfa:
                row.update({"dfa_bias/0": -0.1, "dfa_bias/1": -2.3 + 0.01 * step, "dfa_mass/0": 0.5,
                            "dfa_mass/1": 0.5})
            log.log("step", row)
    plain = Image.open(plot_tau_entropy(tmp_path / "plain", tmp_path / "plain.png"))
    with_dfa = Image.open(plot_tau_entropy(tmp_path / "dfa", tmp_path / "dfa.png"))
    assert plain.size[0] == 1200 and with_dfa.size[0] == 2400  # 5 in per panel at 120 dpi


def test_table6_has_a_with_dfa_row(tmp_path: Path) -> None:
    base = {"data": {"synthetic": {"n_patients": 4}}, "model": {"name": "cmaf_net", "kwargs": {"context_dim": 32}},
            "stages": [{"name": "s", "epochs": 1, "lr": 1e-3, "trainable": "all", "loss": "objective"}]}
    protocol = P.build_protocol("ablations", base, seeds=[0, 1])
    dfa_runs = [r for r in protocol.runs if r.labels["ablation"] == "with_dfa"]
    assert [r.labels["seed"] for r in dfa_runs] == [0, 1]
    cfg = P.run_config(base, dfa_runs[0], tmp_path / "r")
    assert cfg.model.kwargs["dfa"] is True and cfg.model.ablation is None
    assert cfg.model.kwargs["context_dim"] == 32  # merged into the base kwargs, not replacing them
    full = P.run_config(base, next(r for r in protocol.runs if r.labels["ablation"] == "full"), tmp_path / "f")
    assert not full.model.kwargs.get("dfa", False)
