"""The train/ package is laid out by dataflow."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import wsi_cmaf.train as train_pkg

TRAIN_DIR = Path(train_pkg.__file__).parent


def test_nothing_is_left_flat() -> None:
    flat = sorted(p.stem for p in TRAIN_DIR.glob("*.py") if p.stem != "__init__")
    assert flat == ["config", "model_section", "presets"]  # the configuration every subpackage shares
    subpackages = sorted(m.name for m in pkgutil.iter_modules([str(TRAIN_DIR)]) if m.ispkg)
    assert subpackages == ["data", "engine", "evaluate", "paper"]


@pytest.mark.parametrize("old", ["trainer", "manifest", "protocols"])
def test_flat_module_names_are_import_errors(old: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"wsi_cmaf.train.{old}")


def test_unknown_names_are_still_import_errors() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("wsi_cmaf.train.no_such_module")
