"""Training and evaluation, laid out by the dataflow.

* :mod:`wsi_cmaf.train.data` — manifests, datasets, patch stores, synthetic patches, augmentation,
  class-ratio resampling, patches cut from annotated slides;
* :mod:`wsi_cmaf.train.engine` — the trainer: loop, stages, schedules, SAM, mixed precision, checkpoints,
  logging;
* :mod:`wsi_cmaf.train.evaluate` — prediction and metrics;
* :mod:`wsi_cmaf.train.paper` — the paper's protocols (tables, figures, sweeps);
* :mod:`wsi_cmaf.train.config` — the training configuration all of them share (its ``model`` section
  in :mod:`wsi_cmaf.train.model_section`).

Nothing heavy is imported here, so ``import wsi_cmaf.train`` stays cheap.
"""

from __future__ import annotations

__all__ = ["config", "data", "engine", "evaluate", "paper"]
