"""Training and evaluation: manifests, synthetic patches, patch stores, augmentation, metrics, the trainer
(``wsi_cmaf.train.trainer.train``).

Submodules are imported on demand (``from wsi_cmaf.train.manifest import read_manifest``);
this package itself imports nothing heavy so ``import wsi_cmaf.train`` stays cheap.
"""

from __future__ import annotations

__all__ = ["augment", "datasets", "imbalance", "manifest", "metrics", "patchstore", "synthetic_patches", "trainer",
           "trainer_eval"]
