"""AP on subsets of the faces: the smallest ones, and those an attribute file marks (blurred, occluded, dark,
atypical pose, in a crowd; `adyolo.data.attributes`, written by the hard synthetic preset).

A subset is scored like WIDER FACE's easy / medium / hard settings (`widerface_evaluate`): every face stays
in the ground truth, only the faces of the subset count, and a detection of a face outside it is neither
a hit nor a false positive. So `ap_occluded` answers "how well are the occluded faces found", with the
other faces' detections not held against it.

The ground truth is read from the label files (and the image's size) rather than taken from the loader's
targets, so faces the letterbox shrank below the loader's minimum still count, as misses.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from adyolo.data.attributes import ATTRIBUTES, attribute_path_for, read_attribute_file
from adyolo.data.labels import label_path_for, read_label_file
from adyolo.eval.evaluator import xywh_score
from adyolo.eval.widerface.protocol import ImageGroundTruth, widerface_evaluate
from adyolo.layout import LabelRow

# "The smallest faces": smaller side below this many pixels, where a stride-8 cell is larger than the face.
TINY_FACE_PX = 8.0
# Subset name -> faces that count, from ([N] smaller side in pixels, [N, 5] attributes in `ATTRIBUTES` order).
COLUMN = {name: i for i, name in enumerate(ATTRIBUTES)}
SIZE_SUBSETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"tiny": lambda side: side < TINY_FACE_PX}
ATTRIBUTE_SUBSETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "blurred": lambda a: a[:, COLUMN["blur"]] >= 1,
    "occluded": lambda a: a[:, COLUMN["occlusion"]] >= 1,
    "dark": lambda a: a[:, COLUMN["illumination"]] == 1,
    "atypical_pose": lambda a: a[:, COLUMN["pose"]] == 1,
    "crowd": lambda a: a[:, COLUMN["crowd"]] == 1,
}


def subset_ground_truth(image_paths: list[str]) -> tuple[dict[str, ImageGroundTruth], list[str]]:
    """Per image its faces [N, 4] x y w h (pixels, from its label file) and a keep mask per subset
    -> (image path -> ground truth, the subsets every image has). Attribute subsets are there only when
    every image has an attribute file; one whose line count differs from its label file is an error."""
    truth = {}
    with_attributes = all(attribute_path_for(p).is_file() for p in image_paths)
    for path in image_paths:
        labels = read_label_file(label_path_for(path)).labels
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f"{path}: missing or not a readable image")
        height, width = image.shape[:2]
        size = labels[:, LabelRow.SIZE] * [width, height]
        boxes = np.concatenate([labels[:, LabelRow.CENTRE] * [width, height] - size / 2, size], axis=1)
        keep = {name: rule(size.min(axis=1)) for name, rule in SIZE_SUBSETS.items()}
        if with_attributes:
            attributes = read_attribute_file(attribute_path_for(path))
            if len(attributes) != len(labels):
                raise ValueError(
                    f"{attribute_path_for(path)}: {len(attributes)} lines for the {len(labels)} faces of "
                    f"{label_path_for(path)}; an attribute file has one line per label line"
                )
            keep.update({name: rule(attributes) for name, rule in ATTRIBUTE_SUBSETS.items()})
        truth[path] = ImageGroundTruth(boxes.astype(np.float64), keep)
    names = list(SIZE_SUBSETS) + (list(ATTRIBUTE_SUBSETS) if with_attributes else [])
    return truth, names


def score_subsets(predictions: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[dict[str, float], dict[str, int]]:
    """Gathered `adyolo.eval.evaluator.predict` records -> (subset -> AP as `ap_<subset>`, subset -> faces
    that count in it). A subset without faces has AP NaN."""
    by_image = {path: dets for path, dets, _ in predictions}
    truth, names = subset_ground_truth(list(by_image))
    curves = widerface_evaluate({k: xywh_score(d) for k, d in by_image.items()}, truth, settings=names)
    faces = {name: int(sum(t.keep[name].sum() for t in truth.values())) for name in names}
    return {f"ap_{name}": float(curve.ap) for name, curve in curves.items()}, faces
