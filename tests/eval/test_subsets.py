"""AP on subsets of the faces (the smallest, and per attribute), scored as WIDER's settings are: the other
faces stay in the ground truth, and a detection of one of them neither hits nor counts as false."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from adyolo.data.attributes import AttributeFileError, attribute_path_for, write_attribute_file
from adyolo.data.labels import label_path_for, write_label_file
from adyolo.eval.subsets import score_subsets

WIDTH, HEIGHT = 64, 48
# x, y, w, h (pixels) and attributes (blur occlusion illumination pose crowd) of one image's faces.
FACES = [
    ((4, 4, 20, 24), (0, 1, 0, 0, 0)),  # occluded
    ((40, 6, 6, 7), (2, 0, 0, 0, 1)),  # tiny, heavily blurred, in a crowd
    ((30, 20, 30, 26), (0, 0, 0, 1, 1)),  # turned away, in a crowd
]


def write_image(root, name: str, with_attributes: bool = True) -> str:
    image = root / "images" / f"{name}.jpg"
    image.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(image), np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    rows = np.full((len(FACES), 15), -1.0)
    rows[:, 0] = 0
    for i, ((x, y, w, h), _) in enumerate(FACES):
        rows[i, 1:5] = [(x + w / 2) / WIDTH, (y + h / 2) / HEIGHT, w / WIDTH, h / HEIGHT]
    write_label_file(label_path_for(image), rows)
    if with_attributes:
        write_attribute_file(attribute_path_for(image), np.array([a for _, a in FACES]))
    return str(image)


def detection(box, score: float) -> np.ndarray:
    """A `DetectionRow` with this x y w h box."""
    row = np.zeros(16)
    x, y, w, h = box
    row[:5] = [x, y, x + w, y + h, score]
    return row


def test_each_subset_counts_only_its_faces(tmp_path):
    image = write_image(tmp_path, "a")
    found = np.stack([detection(FACES[0][0], 0.9), detection(FACES[2][0], 0.8)])  # the tiny face is missed
    metrics, faces = score_subsets([(image, found, np.zeros((0, 4)))])

    assert faces == {"tiny": 1, "blurred": 1, "occluded": 1, "dark": 0, "atypical_pose": 1, "crowd": 2}
    assert metrics["ap_occluded"] == pytest.approx(1.0) and metrics["ap_atypical_pose"] == pytest.approx(1.0)
    assert metrics["ap_tiny"] == 0 and metrics["ap_blurred"] == 0
    assert metrics["ap_crowd"] == pytest.approx(0.5)  # one of the two crowd faces found, no false detection
    assert math.isnan(metrics["ap_dark"])  # no face in the subset


def test_without_attribute_files_only_the_size_subset(tmp_path):
    image = write_image(tmp_path, "a", with_attributes=False)
    metrics, faces = score_subsets([(image, np.stack([detection(FACES[1][0], 0.5)]), np.zeros((0, 4)))])
    assert metrics == {"ap_tiny": pytest.approx(1.0)} and faces == {"tiny": 1}


def test_an_attribute_file_out_of_step_with_its_labels_is_an_error(tmp_path):
    image = write_image(tmp_path, "a")
    write_attribute_file(attribute_path_for(image), np.array([FACES[0][1]]))
    with pytest.raises(ValueError, match=r"1 lines for the 3 faces of .*a\.txt"):
        score_subsets([(image, np.zeros((0, 16)), np.zeros((0, 4)))])
    attribute_path_for(image).write_text("0 1 0 0\n")
    with pytest.raises(AttributeFileError, match=r"a\.txt:1: '0 1 0 0' is not 'blur occlusion"):
        score_subsets([(image, np.zeros((0, 16)), np.zeros((0, 4)))])


def test_the_records_own_ground_truth_is_used_when_it_holds_every_face(tmp_path):
    """The loader's faces (the evaluation record's) line up with the label file: no image is read. One it
    dropped (too small once letterboxed) sends the image back to its label file, where the face still counts."""
    image = write_image(tmp_path, "a")
    gt = np.array([box for box, _ in FACES], np.float64)
    Path(image).unlink()
    metrics, _ = score_subsets([(image, np.stack([detection(FACES[1][0], 0.5)]), gt)])
    assert metrics["ap_tiny"] == pytest.approx(1.0) and metrics["ap_blurred"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="missing or not a readable image"):
        score_subsets([(image, np.zeros((0, 16)), gt[[0, 2]])])
