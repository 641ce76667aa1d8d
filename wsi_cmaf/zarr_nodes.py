"""Typed access to the members and attributes of a zarr group.

zarr types ``group[name]`` as "array or group", an array read as "array-like or scalar" and
attributes as any JSON value. The project's stores fix which member is which, so these helpers
check that once and hand back the precise type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # zarr is imported where a store is opened, not with the package
    import zarr


def member_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group``; KeyError if it is missing or is a group."""
    import zarr

    node = group[name]
    if not isinstance(node, zarr.Array):
        raise KeyError(f"{name!r} in {group.store_path} is a group, not an array")
    return node


def member_group(group: zarr.Group, name: str) -> zarr.Group:
    """The sub-group ``name`` of ``group``; KeyError if it is missing or is an array."""
    import zarr

    node = group[name]
    if not isinstance(node, zarr.Group):
        raise KeyError(f"{name!r} in {group.store_path} is an array, not a group")
    return node


def read(array: zarr.Array, selection: Any = ...) -> np.ndarray:
    """``array[selection]`` as a numpy array (a scalar selection gives a 0-d array)."""
    return np.asarray(array[selection])


def attrs_dict(node: zarr.Array | zarr.Group) -> dict[str, Any]:
    """The node's attributes as a plain dict (a copy)."""
    return dict(node.attrs)
