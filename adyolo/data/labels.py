"""The YOLO-face label format: one `.txt` per image, one face per line.

    cls cx cy w h x1 y1 x2 y2 x3 y3 x4 y4 x5 y5

Box centre and size and the five landmarks (left eye, right eye, nose, left mouth corner, right
mouth corner, as seen in the image) are normalised by the image width/height. A missing landmark is
`-1 -1`. Lines of only `cls cx cy w h` are accepted as faces without landmarks. An empty or missing
file means an image without faces.

Labels for `root/images/a/b.jpg` live in `root/labels/a/b.txt`; a `.txt` beside the image is used
when there is no `labels` folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adyolo.layout import MISSING_COORD, LabelRow

# A label line: `LabelRow` (class, 4 box, 10 landmark coordinates), or its first 5 values.
NUM_COLUMNS = LabelRow.COLUMNS
BOX_ONLY_COLUMNS = LabelRow.BOX_ONLY_COLUMNS
MISSING = MISSING_COORD


class LabelError(ValueError):
    """A label line that cannot be read; the message names `file:line` and what was expected."""


@dataclass
class LabelFile:
    labels: np.ndarray  # [N, 15] float32 `LabelRow`, normalised; -1 for missing points
    skipped_lines: list[int]  # 1-based line numbers dropped under skip_bad_labels


def label_path_for(image_path: str | Path) -> Path:
    """`.../images/x/y.jpg` -> `.../labels/x/y.txt` (the last `images` folder); else `y.txt` beside it."""
    return sibling_path(image_path, "labels", ".txt")


def sibling_path(image_path: str | Path, folder: str, beside_suffix: str) -> Path:
    """`.../images/x/y.jpg` -> `.../<folder>/x/y.txt` (the last `images` folder); without an `images`
    folder, the image's path with `beside_suffix` for its suffix."""
    image_path = Path(image_path)
    parts = image_path.parts
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        return Path(*parts[:i], folder, *parts[i + 1 :]).with_suffix(".txt")
    return image_path.with_suffix(beside_suffix)


def read_label_file(path: str | Path, skip_bad_labels: bool = False) -> LabelFile:
    """Parse one label file. A malformed line raises `LabelError` (or is skipped and counted)."""
    path = Path(path)
    rows, skipped = [], []
    if not path.exists():
        return LabelFile(np.zeros((0, NUM_COLUMNS), np.float32), skipped)
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_parse_line(line))
        except ValueError as err:
            if not skip_bad_labels:
                raise LabelError(
                    f"{path}:{number}: {err}; expected 'cls cx cy w h' plus 10 landmark coordinates "
                    f"(normalised to [0, 1], -1 for a missing point). Fix the line, or set "
                    f"data.skip_bad_labels=true to skip such lines"
                ) from None
            skipped.append(number)
    labels = np.array(rows, np.float32).reshape(-1, NUM_COLUMNS)
    return LabelFile(labels, skipped)


def _parse_line(line: str) -> list[float]:
    fields = line.split()
    if len(fields) not in (BOX_ONLY_COLUMNS, NUM_COLUMNS):
        raise ValueError(f"{len(fields)} values")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise ValueError(f"not a number in {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"non-finite value in {line.strip()!r}")
    if values[0] < 0 or values[0] != int(values[0]):
        raise ValueError(f"class {fields[0]!r} is not a non-negative integer")
    return values + [MISSING] * (NUM_COLUMNS - len(values))


def write_label_file(path: str | Path, labels: np.ndarray) -> None:
    """Write [N, 15] normalised labels (the inverse of `read_label_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in np.asarray(labels, np.float64).reshape(-1, NUM_COLUMNS):
        values = " ".join("-1" if v == MISSING else f"{v:.6f}" for v in row[1:])
        lines.append(f"{int(row[0])} {values}")
    path.write_text("".join(line + "\n" for line in lines))
