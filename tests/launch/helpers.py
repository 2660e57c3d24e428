"""Helpers for the tests of what the launch commands do (evaluate, detect, export), on the trained tiny run."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def val_images(trained_run: Path) -> Path:
    return trained_run.parent / "synthetic" / "data" / "val" / "images"


def read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image
