"""The train/ package is laid out by dataflow, and the old flat module names still import."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import wsi_cmaf.train as train_pkg

TRAIN_DIR = Path(train_pkg.__file__).parent


@pytest.mark.parametrize("old,new", sorted(train_pkg.MOVED.items()))
def test_old_name_is_the_same_module_as_the_new_one(old: str, new: str) -> None:
    via_old = importlib.import_module(f"wsi_cmaf.train.{old}")
    via_new = importlib.import_module(f"wsi_cmaf.train.{new}")
    assert via_old is via_new
    # the module keeps its real identity, so pickles and reloads name the new path
    assert via_old.__name__ == f"wsi_cmaf.train.{new}"
    assert via_old.__spec__.name == f"wsi_cmaf.train.{new}"


def test_every_moved_target_exists_and_nothing_is_left_flat() -> None:
    flat = sorted(p.stem for p in TRAIN_DIR.glob("*.py") if p.stem != "__init__")
    assert flat == ["config", "model_section", "presets"]  # the configuration every subpackage shares
    subpackages = sorted(m.name for m in pkgutil.iter_modules([str(TRAIN_DIR)]) if m.ispkg)
    assert subpackages == ["data", "engine", "evaluate", "paper"]
    for new in train_pkg.MOVED.values():
        assert (TRAIN_DIR / (new.replace(".", "/") + ".py")).is_file(), new


def test_unknown_names_are_still_import_errors() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("wsi_cmaf.train.no_such_module")
