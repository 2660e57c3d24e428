"""The official WIDER FACE prediction files: pred_dir/<event>/<image name>.txt.

Each file: line 1 the image name, line 2 the number of detections, then one "x y w h score" line per
detection (pixels of the original image). This is what the official MATLAB tool (eval_tools) and its
Python ports read; `launch/evaluate.py --save-txt` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from adyolo.eval.widerface.protocol import prediction_rows


def read_prediction_dir(pred_dir: str | Path) -> dict[str, np.ndarray]:
    """Every pred_dir/**/<name>.txt -> image id (path relative to pred_dir without .txt, e.g.
    "0--Parade/0_Parade_marchingband_1_20") -> [M, 5] x, y, w, h, score (pixels)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction directory {pred_dir} does not exist")
    return {
        path.relative_to(pred_dir).with_suffix("").as_posix(): _read_prediction_file(path)
        for path in sorted(pred_dir.rglob("*.txt"))
    }


def _read_prediction_file(path: Path) -> np.ndarray:
    """One prediction file: line 1 the image name, line 2 the count, then count "x y w h score"
    lines -> [count, 5]. Trailing blank lines are allowed; anything else malformed is a ValueError
    naming file:line."""
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}:1: expected the image name, the file is empty")
    if len(lines) < 2:
        raise ValueError(f"{path}:2: expected the number of detections, the file ends")
    try:
        count = int(lines[1].strip())
    except ValueError:
        raise ValueError(f"{path}:2: expected the number of detections (an integer), got {lines[1]!r}") from None
    detection_lines = lines[2:]
    if len(detection_lines) < count:
        raise ValueError(
            f"{path}:{len(lines) + 1}: expected {count} detection lines after line 2, found {len(detection_lines)}"
        )
    if len(detection_lines) > count:
        raise ValueError(f"{path}:{3 + count}: expected only {count} detection lines (the count on line 2)")
    detections = np.zeros((count, 5))
    for row, line in enumerate(detection_lines):
        detections[row] = _parse_detection(path, 3 + row, line)
    return detections


def _parse_detection(path: Path, line_number: int, line: str) -> list[float]:
    """'x y w h score' -> five floats, or a ValueError naming file:line."""
    fields = line.split()
    try:
        if len(fields) != 5:
            raise ValueError
        return [float(field) for field in fields]
    except ValueError:
        raise ValueError(f"{path}:{line_number}: expected 'x y w h score' (5 numbers), got {line!r}") from None


def write_prediction_dir(pred_dir: str | Path, predictions: Mapping[str, np.ndarray]) -> None:
    """image id ("<event>/<name>") -> [M, 5] x, y, w, h, score, written as pred_dir/<event>/<name>.txt
    in the official layout. Values are written with repr so that reading back is exact."""
    pred_dir = Path(pred_dir)
    for image_id, detections in predictions.items():
        relative = Path(image_id)
        if not image_id or relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"image id {image_id!r} must be a relative path like '<event>/<name>'")
        detections = prediction_rows(image_id, detections)
        lines = [relative.name, str(len(detections))]
        lines += [" ".join(repr(float(value)) for value in row) for row in detections]
        path = pred_dir / f"{image_id}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
