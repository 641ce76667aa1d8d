"""The part of :class:`~wsi_cmaf.output.store.HeatmapStore` that holds the extra tasks of a
multi-task model (issue 17, item 3): one NGFF image group per task.

The primary task (the model's first) stays the store's main image (``0, 1, 2 ...`` at the root),
so everything that reads a single-task store reads a multi-task one unchanged. Every other task
``<task>`` gets the group ``tasks/<task>`` with the same layout as the main image: float32
``(C_task, rows, cols)`` arrays ``0, 1, 2 ...``, chunk ``(C_task, K, K)`` = one inference block,
the same µm transforms and pyramid levels, and ``"ome"`` multiscales + omero channel metadata
naming its classes. The store's layout records ``tasks`` ({task: class names}, primary first);
a single-task store has no ``tasks`` key at all (its layout is byte-for-byte the old one).

Resume safety: a block's task chunks are written before the main chunk and the block's ``done``
flag (:meth:`HeatmapStore.write_block`), so a block marked done always has every task.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from wsi_cmaf.errors import OutputError
from wsi_cmaf.output.ngff import AXES, image_metadata
from wsi_cmaf.output.pyramid import drop_levels, write_nan_mean_levels

#: group under the store root that holds one image group per extra task
TASKS_GROUP = "tasks"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_task_layout(tasks: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    """``tasks`` normalised for a store layout (None for fewer than two tasks); ValueError when a
    task name cannot be a Zarr group name or a task has no classes."""
    if not tasks or len(tasks) < 2:
        return None
    out: dict[str, list[str]] = {}
    for name, classes in tasks.items():
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise ValueError(f"task name {name!r} cannot name a store group: use letters, digits, '_', '-', '.'")
        classes = [str(c) for c in classes]
        if not classes:
            raise ValueError(f"task {name!r} has no classes")
        out[name] = classes
    return out


def task_group_path(task: str) -> str:
    """Path of an extra task's image group inside the store (``tasks/<task>``)."""
    return f"{TASKS_GROUP}/{task}"


class TaskGroupsMixin:
    """Extra-task image groups; mixed into HeatmapStore (uses its ``_root``, ``path``, ``chunk``)."""

    _root: Any
    path: Any
    chunk: tuple[int, int]
    class_names: list[str]
    tasks: dict[str, list[str]]

    @staticmethod
    def _create_task_groups(root: Any, tasks: dict[str, list[str]], shape: tuple[int, int],
                            chunk: tuple[int, int], pyramid: Any) -> None:
        from wsi_cmaf.output.store import _compressor

        names = list(tasks)
        group = root.create_group(TASKS_GROUP, attributes={"wsi_cmaf": {"primary_task": names[0],
                                                                         "tasks": names[1:]}})
        for task in names[1:]:
            classes = tasks[task]
            sub = group.create_group(task, attributes={
                "ome": image_metadata(classes, 1, pyramid, name=f"{task}_probabilities")})
            sub.create_array("0", shape=(len(classes), *shape), chunks=(len(classes), *chunk), dtype="float32",
                             fill_value=np.nan, compressors=_compressor(), dimension_names=AXES)

    @property
    def primary_task(self) -> str | None:
        """Name of the task in the main image (None for a single-task store, whose task is unnamed)."""
        return next(iter(self.tasks), None)

    @property
    def extra_tasks(self) -> list[str]:
        """Tasks stored in ``tasks/<task>`` groups, in the model's order (empty for single-task stores)."""
        return list(self.tasks)[1:]

    def task_class_names(self, task: str | None = None) -> list[str]:
        """Class names of ``task`` (None or the primary task: the main image's)."""
        return list(self.class_names) if self._is_primary(task) else list(self.tasks[self._check_task(task)])

    def _is_primary(self, task: str | None) -> bool:
        return task is None or task == self.primary_task

    def _check_task(self, task: str) -> str:
        if task not in self.tasks:
            known = list(self.tasks) or ["(single-task store: only the main image)"]
            raise OutputError(f"{self.path} has no task {task!r}; its tasks are {known}")
        return task

    def _task_array(self, task: str, level: int) -> Any:
        group = self._root[task_group_path(self._check_task(task))]
        if str(level) not in group:
            raise OutputError(f"{self.path}: task {task!r} has no pyramid level {level} (finalize builds levels >= 1)")
        return group[str(level)]

    def _write_task_chunks(self, block_index: tuple[int, int], rs: slice, cs: slice,
                           chunks: dict[str, np.ndarray] | None) -> None:
        """Write every extra task's (C_task, h, w) chunk of a block (all of them, or a ValueError)."""
        extra = self.extra_tasks
        got = sorted(chunks or {})
        if got != sorted(extra):
            raise ValueError(f"block {tuple(block_index)} needs probabilities of the tasks {extra}, got {got}")
        for task in extra:
            data = np.asarray(chunks[task], dtype=np.float32)
            want = (len(self.tasks[task]), rs.stop - rs.start, cs.stop - cs.start)
            if data.shape != want:
                raise ValueError(f"block {tuple(block_index)}, task {task!r}: needs shape {want}, got {data.shape}")
            self._root[task_group_path(task)]["0"][:, rs, cs] = data

    def _finalize_task_groups(self, levels: int, pyramid: Any) -> None:
        """Pyramid levels and NGFF metadata of every extra task (as finalize does for the main image)."""
        from wsi_cmaf.output.store import _compressor

        for task in self.extra_tasks:
            group = self._root[task_group_path(task)]
            write_nan_mean_levels(group, np.asarray(group["0"][...]), levels, self.chunk,
                                  compressors=_compressor(), dimension_names=AXES, first=1)
            drop_levels(group, levels)
            group.attrs["ome"] = image_metadata(self.tasks[task], levels, pyramid, name=f"{task}_probabilities")
