"""Training and evaluation, laid out by the dataflow.

* :mod:`wsi_cmaf.train.data` — manifests, datasets, patch stores, synthetic patches, augmentation,
  class-ratio resampling, patches cut from annotated slides;
* :mod:`wsi_cmaf.train.engine` — the trainer: loop, stages, schedules, SAM, mixed precision, checkpoints,
  logging;
* :mod:`wsi_cmaf.train.evaluate` — prediction and metrics;
* :mod:`wsi_cmaf.train.paper` — the paper's protocols (tables, figures, sweeps);
* :mod:`wsi_cmaf.train.config` — the training configuration all of them share (its ``model`` section
  in :mod:`wsi_cmaf.train.model_section`).

The modules used to sit side by side in this folder (``wsi_cmaf.train.trainer``,
``wsi_cmaf.train.manifest`` …). Those names stay importable: an import hook resolves each one to
the module's new home and registers the very same module object under both names, so old imports,
``monkeypatch`` targets and pickled references keep working. Nothing heavy is imported here, so
``import wsi_cmaf.train`` stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

#: the flat module names of earlier releases -> where each module lives now
MOVED: dict[str, str] = {
    "manifest": "data.manifest", "datasets": "data.datasets", "dataset_builders": "data.builders",
    "data_setup": "data.setup", "patchstore": "data.patchstore", "synthetic_patches": "data.synthetic_patches",
    "augment": "data.augment", "imbalance": "data.imbalance", "slide_patches": "data.slide_patches",
    "trainer": "engine.trainer", "trainer_loop": "engine.loop", "trainer_state": "engine.state",
    "trainer_eval": "engine.validate", "stages": "engine.stages", "schedules": "engine.schedules",
    "sam": "engine.sam", "checkpoint": "engine.checkpoint", "logging_utils": "engine.logging_utils",
    "evaluation": "evaluate.predict", "metrics": "evaluate.metrics",
    "protocols": "paper.protocols", "protocol_report": "paper.report",
    "protocol_efficiency": "paper.efficiency", "protocol_efficiency_report": "paper.efficiency_report",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve ``wsi_cmaf.train.<old name>`` to the module at its new path (same object)."""

    def __init__(self, package: str, moved: dict[str, str]) -> None:
        self._targets = {f"{package}.{old}": f"{package}.{new}" for old, new in moved.items()}
        self._real_specs: dict[str, importlib.machinery.ModuleSpec] = {}  # by the module's real name

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._targets:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self._targets[spec.name])
        # the import machinery stamps the alias spec on the module it gets back; keep the real one
        # (keyed by name, so two aliases imported from two threads cannot swap specs)
        self._real_specs.setdefault(module.__name__, module.__spec__)
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._real_specs[module.__name__]  # already executed under its real name


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder(__name__, MOVED))

__all__ = ["MOVED", "config", "data", "engine", "evaluate", "paper"]
