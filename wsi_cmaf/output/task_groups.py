"""The extra tasks of a multi-task model in a heatmap store: one NGFF image group per task.

The primary task (the model's first) stays the store's main image (``0, 1, 2 ...`` at the root),
so everything that reads a single-task store reads a multi-task one unchanged. Every other task
``<task>`` gets the group ``tasks/<task>`` with the same layout as the main image: float32
``(C_task, rows, cols)`` arrays ``0, 1, 2 ...``, chunk ``(C_task, K, K)`` = one inference block,
the same µm transforms and pyramid levels, and ``"ome"`` multiscales + omero channel metadata
naming its classes. The store's layout records ``tasks`` ({task: class names}, primary first);
a single-task store has no ``tasks`` key at all.

These are functions on the store's root zarr group and its ``tasks`` mapping;
:class:`~wsi_cmaf.output.store.HeatmapStore` calls them. Resume safety: a block's task chunks are
written before the main chunk and the block's ``done`` flag, so a block marked done always has
every task.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_cmaf.errors import OutputError
from wsi_cmaf.output.codecs import heatmap_compressors
from wsi_cmaf.output.ngff import AXES, image_metadata
from wsi_cmaf.output.pyramid import drop_levels, write_nan_mean_levels
from wsi_cmaf.zarr_nodes import member_array, member_group, read

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


def create_task_groups(root: zarr.Group, tasks: dict[str, list[str]], shape: tuple[int, int],
                       chunk: tuple[int, int], pyramid: Any) -> None:
    """Create the ``tasks`` group and one level-0 image per task after the first under ``root``."""
    names = list(tasks)
    group = root.create_group(TASKS_GROUP, attributes={"wsi_cmaf": {"primary_task": names[0], "tasks": names[1:]}})
    for task in names[1:]:
        classes = tasks[task]
        sub = group.create_group(task, attributes={
            "ome": image_metadata(classes, 1, pyramid, name=f"{task}_probabilities")})
        sub.create_array("0", shape=(len(classes), *shape), chunks=(len(classes), *chunk), dtype="float32",
                         fill_value=np.nan, compressors=heatmap_compressors(), dimension_names=AXES)


def check_task(tasks: dict[str, list[str]], task: str, where: Path) -> str:
    """``task`` when the store at ``where`` has it, else :class:`OutputError` listing its tasks."""
    if task not in tasks:
        known = list(tasks) or ["(single-task store: only the main image)"]
        raise OutputError(f"{where} has no task {task!r}; its tasks are {known}")
    return task


def task_array(root: zarr.Group, tasks: dict[str, list[str]], task: str, level: int, where: Path) -> zarr.Array:
    """Pyramid ``level`` of extra task ``task``; :class:`OutputError` when either does not exist."""
    group = member_group(root, task_group_path(check_task(tasks, task, where)))
    if str(level) not in group:
        raise OutputError(f"{where}: task {task!r} has no pyramid level {level} (finalize builds levels >= 1)")
    return member_array(group, str(level))


def write_task_chunks(root: zarr.Group, tasks: dict[str, list[str]], block_index: tuple[int, int],
                      rs: slice, cs: slice, chunks: dict[str, np.ndarray] | None) -> None:
    """Write every extra task's (C_task, h, w) chunk of a block (all of them, or a ValueError)."""
    extra = list(tasks)[1:]
    chunks = chunks or {}
    got = sorted(chunks)
    if got != sorted(extra):
        raise ValueError(f"block {tuple(block_index)} needs probabilities of the tasks {extra}, got {got}")
    for task in extra:
        data = np.asarray(chunks[task], dtype=np.float32)
        want = (len(tasks[task]), rs.stop - rs.start, cs.stop - cs.start)
        if data.shape != want:
            raise ValueError(f"block {tuple(block_index)}, task {task!r}: needs shape {want}, got {data.shape}")
        member_array(root, f"{task_group_path(task)}/0")[:, rs, cs] = data


def finalize_task_groups(root: zarr.Group, tasks: dict[str, list[str]], levels: int, chunk: tuple[int, int],
                         pyramid: Any) -> None:
    """Pyramid levels and NGFF metadata of every extra task (as finalize does for the main image)."""
    for task in list(tasks)[1:]:
        group = member_group(root, task_group_path(task))
        write_nan_mean_levels(group, read(member_array(group, "0")), levels, chunk,
                              compressors=heatmap_compressors(), dimension_names=AXES, first=1)
        drop_levels(group, levels)
        group.attrs["ome"] = image_metadata(tasks[task], levels, pyramid, name=f"{task}_probabilities")
