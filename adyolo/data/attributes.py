"""Per-face attribute files: what makes each face of a label file hard, for the evaluation to report.

Beside `root/labels/a/b.txt` (`adyolo.data.labels`), `root/attributes/a/b.txt` holds one line per label
line, in the same order, of small integers in WIDER FACE's own vocabulary plus a crowd flag:

    blur occlusion illumination pose crowd

    blur          0 clear, 1 normal blur, 2 heavy blur
    occlusion     0 none, 1 partial, 2 heavy
    illumination  0 normal, 1 extreme (dark or washed out)
    pose          0 typical, 1 atypical (profile or strongly rotated)
    crowd         0 not in a crowd, 1 one face of a crowd

The hard synthetic preset writes them; a dataset without them is evaluated by face size alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adyolo.data.labels import sibling_path

ATTRIBUTES = ("blur", "occlusion", "illumination", "pose", "crowd")
NUM_ATTRIBUTES = len(ATTRIBUTES)
# The largest value of each attribute, in `ATTRIBUTES` order.
MAX_VALUES = (2, 2, 1, 1, 1)


class AttributeFileError(ValueError):
    """An attribute file that cannot be read; the message names `file:line`."""


def attribute_path_for(image_path: str | Path) -> Path:
    """`.../images/x/y.jpg` -> `.../attributes/x/y.txt` (the last `images` folder); `y.attributes.txt`
    beside the image when there is no `images` folder."""
    return sibling_path(image_path, "attributes", ".attributes.txt")


def write_attribute_file(path: str | Path, attributes: np.ndarray) -> None:
    """Write [N, 5] integer attributes (`ATTRIBUTES` order), one line per face."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.asarray(attributes, np.int64).reshape(-1, NUM_ATTRIBUTES)
    path.write_text("".join(" ".join(str(int(v)) for v in row) + "\n" for row in rows))


def read_attribute_file(path: str | Path) -> np.ndarray:
    """[N, 5] int64 attributes of one image; raises `AttributeFileError` naming `file:line` for a bad line."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            values = [int(f) for f in fields]
        except ValueError:
            values = []
        if len(values) != NUM_ATTRIBUTES or any(not 0 <= v <= m for v, m in zip(values, MAX_VALUES)):
            raise AttributeFileError(
                f"{path}:{number}: {line.strip()!r} is not '{' '.join(ATTRIBUTES)}' as integers in the ranges "
                f"{', '.join(f'0-{m}' for m in MAX_VALUES)}; fix the line or delete the attributes/ folder"
            )
        rows.append(values)
    return np.array(rows, np.int64).reshape(-1, NUM_ATTRIBUTES)
