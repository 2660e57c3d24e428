"""Run launch/ scripts in the test process (fast: no interpreter start, no re-import of torch)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np

from tests.engine.runs import ROOT


def load_script(name: str) -> ModuleType:
    """launch/<name>.py as a module (launch/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module: ModuleType, *args: str, monkeypatch) -> int:
    """`main()` of a script with the given command line; returns its exit code."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, args)])
    return module.main()


def val_images(trained_run: Path) -> Path:
    return trained_run.parent / "synthetic" / "data" / "val" / "images"


def read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image
