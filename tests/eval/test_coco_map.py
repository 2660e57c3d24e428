"""Generic mAP@0.5 through pycocotools: known answers and agreement with the WIDER protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adyolo.eval.coco_map import coco_map50
from adyolo.eval.widerface.protocol import SETTINGS, ImageGroundTruth, widerface_evaluate


def grid_faces(num_faces: int, side: float = 20.0, spacing: float = 30.0, per_row: int = 20) -> np.ndarray:
    """[num_faces, 4] non-overlapping square faces on a grid."""
    index = np.arange(num_faces)
    return np.column_stack(
        [(index % per_row) * spacing, (index // per_row) * spacing, np.full(num_faces, side), np.full(num_faces, side)]
    ).astype(np.float64)


def with_scores(boxes: np.ndarray, scores) -> np.ndarray:
    return np.column_stack([boxes, scores])


def test_perfect_detector_scores_one():
    ground_truth = {"a": grid_faces(5), "b": grid_faces(3), "c": np.zeros((0, 4))}
    predictions = {
        image_id: with_scores(boxes, np.linspace(0.9, 0.5, len(boxes))) for image_id, boxes in ground_truth.items()
    }
    assert coco_map50(predictions, ground_truth) == pytest.approx(1.0)


def test_more_than_100_faces_in_one_image():
    # With pycocotools' default maxDets of 100 at most 100 of the 150 faces could be matched: the
    # precision at recall above 2/3 would be 0 and AP about 0.67. Raising the cap gives 1.0.
    boxes = grid_faces(150)
    predictions = {"crowd": with_scores(boxes, np.linspace(0.99, 0.1, 150))}
    assert coco_map50(predictions, {"crowd": boxes}) == pytest.approx(1.0)
    assert coco_map50(predictions, {"crowd": boxes}, max_detections=100) < 0.7


def test_hand_case():
    # 2 faces; detections 0.9 on A (TP), 0.8 elsewhere (FP), 0.7 on B (TP).
    # Precision envelope: 1 for recall <= 0.5, 2/3 for recall in (0.5, 1].
    # 101-point interpolation: recall points 0.00..0.50 (51 points) at 1, 0.51..1.00 (50) at 2/3:
    # AP = (51 + 50 * 2/3) / 101.
    faces = np.array([[10.0, 10.0, 20.0, 20.0], [100.0, 10.0, 20.0, 20.0]])
    predictions = {"img": np.array([[10, 10, 20, 20, 0.9], [300, 300, 20, 20, 0.8], [100, 10, 20, 20, 0.7]], float)}
    assert coco_map50(predictions, {"img": faces}) == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_agrees_with_widerface_protocol_where_they_coincide():
    # Every face counts, faces are 40 px and far apart (the +1 pixel convention moves IoUs by a
    # few percent, never across 0.5 here), one detection per found face, FPs far from any face,
    # distinct scores spaced well above 1/1000 after normalisation (so each of WIDER's thresholds
    # adds at most one detection and its curve is the exact PR curve). Both then rank the same
    # TP/FP sequence; they differ only in how the area is taken: WIDER all-point vs COCO's 101
    # sampled recall points, which for 30 faces differ by well under 0.02.
    rng = np.random.default_rng(7)
    ground_truth, predictions, rows = {}, {}, []
    for image in range(6):
        faces = grid_faces(5, side=40.0, spacing=100.0, per_row=5) + [0.0, 200.0 * image, 0.0, 0.0]
        ground_truth[f"e/{image}"] = faces
        found = faces[rng.random(len(faces)) < 0.8] + rng.uniform(-2, 2, (1, 4))  # slightly off, IoU > 0.8
        false_positives = np.array([[600.0 + 100 * k, 200.0 * image, 40.0, 40.0] for k in range(rng.integers(0, 3))])
        rows.append((f"e/{image}", np.concatenate([found, false_positives.reshape(-1, 4)])))
    scores = rng.permutation(np.linspace(0.05, 0.95, sum(len(boxes) for _, boxes in rows)))
    start = 0
    for image_id, boxes in rows:
        predictions[image_id] = with_scores(boxes, scores[start : start + len(boxes)])
        start += len(boxes)

    truth = {
        image_id: ImageGroundTruth(faces, {setting: np.ones(len(faces), dtype=bool) for setting in SETTINGS})
        for image_id, faces in ground_truth.items()
    }
    wider_ap = widerface_evaluate(predictions, truth)["hard"].ap
    coco_ap = coco_map50(predictions, ground_truth)
    assert 0.3 < wider_ap < 0.99  # a non-trivial curve
    assert coco_ap == pytest.approx(wider_ap, abs=0.02)


def test_no_detections_and_no_faces():
    faces = {"img": np.array([[0.0, 0.0, 30.0, 30.0]])}
    assert coco_map50({}, faces) == 0.0
    assert coco_map50({"img": np.zeros((0, 5))}, faces) == 0.0
    assert math.isnan(coco_map50({"img": np.array([[0.0, 0.0, 30.0, 30.0, 0.5]])}, {"img": np.zeros((0, 4))}))


def test_unknown_image_id_is_an_error():
    with pytest.raises(ValueError, match="typo"):
        coco_map50({"typo": np.array([[0.0, 0.0, 30.0, 30.0, 0.5]])}, {"img": np.zeros((0, 4))})
