"""AP on subsets of the faces: the smallest ones, and those an attribute file marks (blurred, occluded, dark,
atypical pose, in a crowd; `adyolo.data.attributes`, written by the hard synthetic preset).

A subset is scored like WIDER FACE's easy / medium / hard settings (`widerface_evaluate`): every face stays
in the ground truth, only the faces of the subset count, and a detection of a face outside it is neither
a hit nor a false positive. So `ap_occluded` answers "how well are the occluded faces found", with the
other faces' detections not held against it.

The faces are the evaluation records' own ground truth (the loader's, in the original image's pixels), in
the order of the label file, which the attribute file follows line for line. Where the loader dropped a face
(one the letterbox shrank below its minimum), the image's faces are read from its label file instead, so
they still count, as misses.
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


def subset_ground_truth(
    predictions: list[tuple[str, np.ndarray, np.ndarray]],
) -> tuple[dict[str, ImageGroundTruth], list[str]]:
    """Per image its faces [N, 4] x y w h (pixels) and a keep mask per subset -> (image path -> ground truth,
    the subsets every image has). Attribute subsets are there only when every image has an attribute file;
    one whose line count differs from its label file is an error."""
    truth = {}
    with_attributes = all(attribute_path_for(path).is_file() for path, _, _ in predictions)
    for path, _, gt in predictions:
        labels = read_label_file(label_path_for(path)).labels
        boxes = np.asarray(gt, np.float64).reshape(-1, 4)
        if len(boxes) != len(labels):
            boxes = _label_boxes(path, labels)
        keep = {name: rule(boxes[:, 2:].min(axis=1)) for name, rule in SIZE_SUBSETS.items()}
        if with_attributes:
            attributes = read_attribute_file(attribute_path_for(path))
            if len(attributes) != len(labels):
                raise ValueError(
                    f"{attribute_path_for(path)}: {len(attributes)} lines for the {len(labels)} faces of "
                    f"{label_path_for(path)}; an attribute file has one line per label line"
                )
            keep.update({name: rule(attributes) for name, rule in ATTRIBUTE_SUBSETS.items()})
        truth[path] = ImageGroundTruth(boxes, keep)
    names = list(SIZE_SUBSETS) + (list(ATTRIBUTE_SUBSETS) if with_attributes else [])
    return truth, names


def _label_boxes(path: str, labels: np.ndarray) -> np.ndarray:
    """[N, 4] x y w h pixels of a label file's faces, denormalised by the image's size."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: missing or not a readable image")
    scale = np.array(image.shape[1::-1][:2], np.float64)  # width, height
    size = labels[:, LabelRow.SIZE] * scale
    return np.concatenate([labels[:, LabelRow.CENTRE] * scale - size / 2, size], axis=1)


def score_subsets(predictions: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[dict[str, float], dict[str, int]]:
    """Gathered `adyolo.eval.evaluator.predict` records -> (subset -> AP as `ap_<subset>`, subset -> faces
    that count in it). A subset without faces has AP NaN."""
    unique = list({path: (path, dets, gt) for path, dets, gt in predictions}.values())  # padding repeats once
    truth, names = subset_ground_truth(unique)
    curves = widerface_evaluate({path: xywh_score(dets) for path, dets, _ in unique}, truth, settings=names)
    faces = {name: int(sum(t.keep[name].sum() for t in truth.values())) for name in names}
    return {f"ap_{name}": float(curve.ap) for name, curve in curves.items()}, faces
