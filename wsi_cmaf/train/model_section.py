"""The ``model`` section of a training configuration (:class:`ModelSection`).

The network (registry name, ablation, kwargs), the input geometry written into the saved
``config.json``, and the multi-task heads (``tasks``, ``task_class_names``) with their checks.
:mod:`wsi_cmaf.train.config` builds it from the ``model:`` mapping and re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wsi_cmaf.errors import ConfigError, ModelConfigError
from wsi_cmaf.models.heads import check_tasks
from wsi_cmaf.train.data.manifest import BREAKHIS_SUBTYPE_ORDER

#: Registry models with one head per task (``wsi_cmaf.models.multiview``); ``model.tasks`` needs one.
TASK_MODELS = ("multitask", "multiview")


@dataclass
class ModelSection:
    """The network and the geometry written into its ``config.json`` (see ``ModelConfig``)."""

    name: str = "cmaf_net"
    ablation: str | None = None  # a Table 6 row (``wsi_cmaf.models.ABLATIONS``)
    kwargs: dict[str, Any] = field(default_factory=dict)  # CMAFConfig overrides / timm kwargs
    class_names: list[str] = field(default_factory=lambda: ["benign", "malignant"])
    positive_class: int = 1
    input_size: int = 224
    spacing_um_px: float = 4.0
    patch_size_pixels: int = 50
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    stain_normalization: str | None = "macenko"
    # Multi-task heads: {task: number of classes}, the first task primary (its classes are
    # class_names). None = one task. task_class_names names the other tasks' classes (default:
    # the BreakHis order for an 8-class "subtype" task, else "0", "1", ...).
    tasks: dict[str, int] | None = None
    task_class_names: dict[str, list[str]] | None = None

    @property
    def num_classes(self) -> int:
        """Number of output classes (= len(class_names))."""
        return len(self.class_names)

    @property
    def is_task_model(self) -> bool:
        """Whether the model is a multi-task wrapper (``multitask`` / ``multiview``)."""
        return self.name in TASK_MODELS

    @property
    def num_views(self) -> int:
        """Views per tile the model takes (``multiview`` defaults to 2, every other model to 1)."""
        return int(self.kwargs.get("num_views", 2 if self.name == "multiview" else 1))

    @property
    def backbone_name(self) -> str:
        """The network that extracts features: the wrapper's backbone, else the model itself."""
        if self.is_task_model:
            return str(self.kwargs.get("backbone", "cmaf_net"))
        return self.name

    @property
    def is_cmaf(self) -> bool:
        """Whether the model (or the multi-task wrapper's backbone) is CMAF-Net (three-stage
        training) rather than a timm baseline."""
        return not self.backbone_name.startswith("timm:")

    @property
    def primary_task(self) -> str:
        """Name of the primary task (the first of ``tasks``; "malignancy" without tasks)."""
        return next(iter(self.tasks)) if self.tasks else "malignancy"

    def all_task_class_names(self) -> dict[str, list[str]]:
        """``{task: class names}`` for every task, the primary one first (its names: ``class_names``)."""
        tasks = self.tasks or {self.primary_task: self.num_classes}
        given = dict(self.task_class_names or {})
        out: dict[str, list[str]] = {}
        for i, (name, n) in enumerate(tasks.items()):
            if i == 0:
                out[name] = list(self.class_names)
            elif name in given:
                out[name] = [str(c) for c in given[name]]
            elif name == "subtype" and n == len(BREAKHIS_SUBTYPE_ORDER):
                out[name] = list(BREAKHIS_SUBTYPE_ORDER)
            else:
                out[name] = [str(c) for c in range(n)]
        return out

    def extra_tasks(self) -> dict[str, list[str]]:
        """``{task: class names}`` of the non-primary tasks (empty for a single-task model)."""
        return dict(list(self.all_task_class_names().items())[1:]) if self.tasks else {}

    def validate_tasks(self, task_weights: dict[str, float]) -> None:
        """Raise :class:`ConfigError` when ``tasks`` / ``task_class_names`` / ``task_weights`` cannot apply."""
        if self.tasks is not None and self.num_views > 1:
            raise ConfigError(f"model.tasks with {self.num_views} views: multi-view training reads a patch store, "
                              "which carries no secondary-task labels; train a multi-view model with one task, "
                              "or a multi-task model (model.name: multitask) on a manifest")
        if self.tasks is None:
            if self.task_class_names or task_weights:
                raise ConfigError("model.task_class_names and loss.task_weights need model.tasks "
                                  "(e.g. tasks: {malignancy: 2, subtype: 8})")
            return
        if not self.is_task_model:
            raise ConfigError(f"model.tasks needs a model with one head per task ({' or '.join(TASK_MODELS)}, "
                              f"with the network as kwargs.backbone); model.name is {self.name!r}")
        if "tasks" in self.kwargs or "task_class_names" in self.kwargs:
            raise ConfigError("give the tasks as model.tasks / model.task_class_names, not inside model.kwargs")
        try:
            tasks = check_tasks(self.tasks)
        except ModelConfigError as exc:
            raise ConfigError(f"model.tasks: {exc}") from exc
        primary = next(iter(tasks))
        if tasks[primary] != self.num_classes:
            raise ConfigError(f"model.tasks: the primary task {primary!r} has {tasks[primary]} classes but "
                              f"model.class_names has {self.num_classes} {list(self.class_names)}; the first task "
                              "is the primary one and uses the manifest's label column")
        for name, names in (self.task_class_names or {}).items():
            if name not in tasks or name == primary:
                raise ConfigError(f"model.task_class_names: {name!r} is not a secondary task of {list(tasks)} "
                                  "(the primary task's names are model.class_names)")
            if len(names) != tasks[name] or len(set(map(str, names))) != len(names):
                raise ConfigError(f"model.task_class_names[{name!r}] needs {tasks[name]} distinct names, "
                                  f"got {list(names)}")
        for name in task_weights:
            if name not in tasks or name == primary:
                raise ConfigError(f"loss.task_weights: {name!r} is not a secondary task of {list(tasks)} (the "
                                  "primary task's loss is the configured objective, unweighted)")
