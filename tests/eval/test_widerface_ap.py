"""WIDER FACE protocol: hand-worked cases for IoU, matching, ignore faces, AP, and the file formats."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy.io import savemat

from adyolo.eval.widerface.ground_truth import load_widerface_mat
from adyolo.eval.widerface.prediction_files import read_prediction_dir, write_prediction_dir
from adyolo.eval.widerface.protocol import (
    SETTINGS,
    ImageGroundTruth,
    iou_matrix_plus_one,
    keep_by_size,
    score_thresholds,
    voc_average_precision,
    widerface_evaluate,
)

# Two well separated 20 x 20 faces and a box far from both.
FACE_A = [10.0, 10.0, 20.0, 20.0]
FACE_B = [100.0, 10.0, 20.0, 20.0]
NOWHERE = [300.0, 300.0, 20.0, 20.0]


def all_kept(boxes) -> ImageGroundTruth:
    """Ground truth in which every face counts in every setting."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return ImageGroundTruth(boxes, {setting: np.ones(len(boxes), dtype=bool) for setting in SETTINGS})


def detections(*rows) -> np.ndarray:
    """(box, score) pairs -> [M, 5]."""
    return np.array([[*box, score] for box, score in rows], dtype=np.float64).reshape(-1, 5)


def test_iou_uses_the_plus_one_pixel_convention():
    # A = (0, 0, 9, 9) spans x, y in 0..9 inclusive: 10 x 10 = 100 pixels.
    # B = (5, 5, 9, 9) spans 5..14: intersection 5..9 = 5 x 5 = 25; union 100 + 100 - 25 = 175.
    # C = (9, 0, 9, 9) spans x 9..18: touches A at column 9, intersection 1 x 10 = 10; union 190.
    # D = (20, 0, 9, 9) is disjoint from A: 0.
    a = np.array([[0, 0, 9, 9]], dtype=np.float64)
    others = np.array([[5, 5, 9, 9], [9, 0, 9, 9], [20, 0, 9, 9], [0, 0, 9, 9]], dtype=np.float64)
    np.testing.assert_allclose(iou_matrix_plus_one(a, others), [[25 / 175, 10 / 190, 0.0, 1.0]], rtol=1e-12)
    assert iou_matrix_plus_one(a, np.zeros((0, 4))).shape == (1, 0)


def test_thresholds_match_the_official_grid():
    thresholds = score_thresholds(1000)
    assert thresholds.shape == (1000,)
    assert thresholds[0] == pytest.approx(0.999) and thresholds[-1] == 0.0
    assert np.all(np.diff(thresholds) < 0)


def test_voc_average_precision_hand_case():
    # Points (recall, precision): (0.5, 1), (1, 0.5). Envelope keeps them; area 0.5 * 1 + 0.5 * 0.5.
    assert voc_average_precision(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)


def test_perfect_detector_has_ap_one_in_every_setting():
    rng = np.random.default_rng(0)
    ground_truth, predictions = {}, {}
    for image in range(4):
        # Faces of side 40 (easy+), 20 (medium+) and 10 (hard only), well apart.
        boxes = np.array([[60.0 * i, 50.0 * image, side, side] for i, side in enumerate([40, 20, 10, 40, 10])])
        ground_truth[f"event/{image}"] = ImageGroundTruth(
            boxes, keep_by_size(boxes, {"easy": 32, "medium": 16, "hard": 0})
        )
        predictions[f"event/{image}"] = np.column_stack([boxes, rng.uniform(0.1, 1.0, len(boxes))])
    curves = widerface_evaluate(predictions, ground_truth)
    assert set(curves) == set(SETTINGS)
    for curve in curves.values():
        assert curve.ap == pytest.approx(1.0)
        assert curve.recall[-1] == pytest.approx(1.0)
        assert curve.precision.shape == curve.recall.shape == curve.thresholds.shape == (1000,)


def test_hand_built_ap():
    # 2 faces, 3 predictions: 0.9 on A (TP), 0.8 nowhere (FP), 0.7 on B (TP).
    # Min-max normalised: 1.0, 0.5, 0.0 (the 0.5 may round either side, which moves one threshold,
    # not the area). Thresholds t_k run 0.999 .. 0.0:
    #   t > 0.5:     proposals 1, recalled 1 -> precision 1,   recall 0.5
    #   0 < t <= .5: proposals 2, recalled 1 -> precision 0.5, recall 0.5
    #   t = 0:       proposals 3, recalled 2 -> precision 2/3, recall 1   (only the last threshold)
    # Envelope: precision 1 up to recall 0.5, then 2/3 up to recall 1.
    # AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
    ground_truth = {"e/img": all_kept([FACE_A, FACE_B])}
    predictions = {"e/img": detections((FACE_A, 0.9), (NOWHERE, 0.8), (FACE_B, 0.7))}
    curve = widerface_evaluate(predictions, ground_truth)["hard"]
    assert curve.ap == pytest.approx(5 / 6, rel=1e-12)
    assert curve.precision[0] == 1.0 and curve.recall[0] == 0.5
    assert curve.precision[-1] == pytest.approx(2 / 3) and curve.recall[-1] == 1.0
    # The order of predictions in the input does not matter (they are sorted by score).
    shuffled = {"e/img": predictions["e/img"][[2, 0, 1]]}
    assert widerface_evaluate(shuffled, ground_truth)["hard"].ap == pytest.approx(5 / 6, rel=1e-12)


def test_duplicate_of_a_recalled_face_is_a_false_positive():
    # As the hand case above, with the FP replaced by a second (slightly shifted) box on face A:
    # A is already recalled, so the duplicate is a proposal that recalls nothing -> AP 5/6 again.
    shifted_a = [11.0, 11.0, 20.0, 20.0]  # IoU with A = 20 * 20 / (2 * 21 * 21 - 20 * 20) ~ 0.83
    ground_truth = {"e/img": all_kept([FACE_A, FACE_B])}
    predictions = {"e/img": detections((FACE_A, 0.9), (shifted_a, 0.8), (FACE_B, 0.7))}
    curve = widerface_evaluate(predictions, ground_truth)["hard"]
    assert curve.ap == pytest.approx(5 / 6, rel=1e-12)
    assert curve.precision[-1] == pytest.approx(2 / 3)
    # Without the duplicate, every proposal is a TP: AP 1.
    without = {"e/img": detections((FACE_A, 0.9), (FACE_B, 0.7))}
    assert widerface_evaluate(without, ground_truth)["hard"].ap == pytest.approx(1.0)


def test_match_to_an_ignored_face_is_neither_tp_nor_fp():
    # Face A counts in easy and hard; B (small) counts only in hard.
    # Predictions: 0.9 on B, 0.8 nowhere (FP), 0.7 on A -> normalised 1.0, 0.5, 0.0.
    # easy: the B prediction is ignored.
    #   t > 0.5:     proposals 0 (precision 0/0 -> 0), recall 0
    #   0 < t <= .5: proposals 1 (the FP), recalled 0 -> precision 0, recall 0
    #   t = 0:       proposals 2, recalled 1 (A of 1 easy face) -> precision 0.5, recall 1
    #   AP = 1 * 0.5 = 0.5 (it would be 1/3 if the B prediction counted as an FP).
    # hard: exactly the hand case (TP, FP, TP over 2 faces) -> AP 5/6.
    boxes = np.array([FACE_A, FACE_B])
    keep = {
        "easy": np.array([True, False]),
        "medium": np.array([True, False]),
        "hard": np.array([True, True]),
    }
    ground_truth = {"e/img": ImageGroundTruth(boxes, keep)}
    predictions = {"e/img": detections((FACE_B, 0.9), (NOWHERE, 0.8), (FACE_A, 0.7))}
    curves = widerface_evaluate(predictions, ground_truth)
    assert curves["easy"].ap == pytest.approx(0.5, rel=1e-12)
    assert curves["easy"].precision[0] == 0.0 and curves["easy"].recall[0] == 0.0
    assert curves["easy"].precision[-1] == pytest.approx(0.5)
    assert curves["hard"].ap == pytest.approx(5 / 6, rel=1e-12)


def test_image_without_predictions_lowers_recall():
    # Image 1: face A found (the only prediction; max == min, so its normalised score is 1 and it
    # passes every threshold). Image 2: face B, no predictions. Precision 1, recall 1/2 at every
    # threshold -> AP = 0.5 * 1 = 0.5. Missing from the dict and an empty array behave alike.
    ground_truth = {"e/one": all_kept([FACE_A]), "e/two": all_kept([FACE_B])}
    found_a = detections((FACE_A, 0.6))
    for predictions in ({"e/one": found_a}, {"e/one": found_a, "e/two": np.zeros((0, 5))}):
        curve = widerface_evaluate(predictions, ground_truth)["hard"]
        assert curve.ap == pytest.approx(0.5)
        np.testing.assert_allclose(curve.recall, 0.5)
        np.testing.assert_allclose(curve.precision, 1.0)


def test_image_without_faces_adds_false_positives():
    # Image 1: face A found with score 0.7. Image 2: no faces, one prediction with score 0.9.
    # Normalised: FP 1.0, TP 0.0.
    #   t > 0: proposals 1 (the FP), recalled 0 -> precision 0, recall 0
    #   t = 0: proposals 2, recalled 1 -> precision 0.5, recall 1   => AP 0.5
    ground_truth = {"e/one": all_kept([FACE_A]), "e/empty": all_kept(np.zeros((0, 4)))}
    predictions = {"e/one": detections((FACE_A, 0.7)), "e/empty": detections((NOWHERE, 0.9))}
    assert widerface_evaluate(predictions, ground_truth)["hard"].ap == pytest.approx(0.5, rel=1e-12)


def test_setting_without_faces_has_undefined_ap():
    boxes = np.array([[0.0, 0.0, 10.0, 10.0]])
    ground_truth = {"e/img": ImageGroundTruth(boxes, keep_by_size(boxes, {"easy": 32, "hard": 0}))}
    curves = widerface_evaluate({"e/img": detections((boxes[0], 0.5))}, ground_truth, settings=("easy", "hard"))
    assert math.isnan(curves["easy"].ap)
    assert curves["hard"].ap == pytest.approx(1.0)


def test_unknown_image_id_is_an_error():
    with pytest.raises(ValueError, match="e/typo"):
        widerface_evaluate({"e/typo": detections((FACE_A, 0.5))}, {"e/img": all_kept([FACE_A])})


def test_keep_by_size():
    # min(w, h): 40, 20, 10, 16 (a 16 x 50 face is as small as its narrow side).
    boxes = np.array([[0, 0, 40, 45], [0, 0, 20, 30], [0, 0, 10, 10], [0, 0, 50, 16]], dtype=np.float64)
    keep = keep_by_size(boxes, {"easy": 32, "medium": 16, "hard": 0})
    np.testing.assert_array_equal(keep["easy"], [True, False, False, False])
    np.testing.assert_array_equal(keep["medium"], [True, True, False, True])
    np.testing.assert_array_equal(keep["hard"], [True, True, True, True])
    assert keep_by_size(np.zeros((0, 4)), {"hard": 0})["hard"].shape == (0,)


def test_prediction_dir_round_trip(tmp_path):
    predictions = {
        "0--Parade/0_Parade_marchingband_1_20": np.array([[1.5, 2.0, 30.25, 40.0, 0.987654321], [5, 6, 7, 8, 0.1]]),
        "1--Handshaking/1_Handshaking_2": np.zeros((0, 5)),
    }
    write_prediction_dir(tmp_path, predictions)
    lines = (tmp_path / "0--Parade" / "0_Parade_marchingband_1_20.txt").read_text().splitlines()
    assert lines[:2] == ["0_Parade_marchingband_1_20", "2"]
    loaded = read_prediction_dir(tmp_path)
    assert set(loaded) == set(predictions)
    for image_id, rows in predictions.items():
        np.testing.assert_array_equal(loaded[image_id], rows)
        assert loaded[image_id].shape == rows.shape


def test_malformed_prediction_line_names_file_and_line(tmp_path):
    path = tmp_path / "0--Parade" / "img.txt"
    path.parent.mkdir()
    path.write_text("img\n2\n1 2 3 4 0.5\n1 2 3 4\n")  # line 4 lacks the score
    with pytest.raises(ValueError, match=re.escape(f"{path}:4") + ".*x y w h score"):
        read_prediction_dir(tmp_path)
    path.write_text("img\ntwo\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2")):
        read_prediction_dir(tmp_path)
    path.write_text("img\n2\n1 2 3 4 0.5\n")  # one detection line short
    with pytest.raises(ValueError, match=re.escape(f"{path}:4")):
        read_prediction_dir(tmp_path)


def _cell(items) -> np.ndarray:
    """A MATLAB column cell array: object array [K, 1]."""
    cell = np.empty((len(items), 1), dtype=object)
    for index, item in enumerate(items):
        cell[index, 0] = item
    return cell


def test_load_widerface_mat(tmp_path):
    # Two events; the first has an image with two faces and an image with none.
    parade_boxes = np.array([[1.0, 2.0, 30.0, 40.0], [5.0, 6.0, 7.0, 8.0]])
    hand_boxes = np.array([[10.0, 10.0, 50.0, 60.0]])
    savemat(
        tmp_path / "wider_face_val.mat",
        {
            "event_list": _cell(["0--Parade", "1--Handshaking"]),
            "file_list": _cell([_cell(["0_Parade_a_1", "0_Parade_b_2"]), _cell(["1_Handshaking_c_3"])]),
            "face_bbx_list": _cell([_cell([parade_boxes, np.zeros((0, 4))]), _cell([hand_boxes])]),
        },
    )
    # 1-based indices of the faces that count: easy only the first parade face, medium/hard both.
    kept = {
        "easy": [np.array([[1]]), np.array([[1]])],
        "medium": [np.array([[1], [2]]), np.array([[1]])],
        "hard": [np.array([[2], [1]]), np.array([[1]])],
    }
    for setting, (parade_keep, hand_keep) in kept.items():
        gt_list = _cell([_cell([parade_keep, np.zeros((0, 1))]), _cell([hand_keep])])
        savemat(tmp_path / f"wider_{setting}_val.mat", {"gt_list": gt_list})

    ground_truth = load_widerface_mat(tmp_path)
    assert list(ground_truth) == [
        "0--Parade/0_Parade_a_1",
        "0--Parade/0_Parade_b_2",
        "1--Handshaking/1_Handshaking_c_3",
    ]
    parade = ground_truth["0--Parade/0_Parade_a_1"]
    np.testing.assert_array_equal(parade.boxes, parade_boxes)
    np.testing.assert_array_equal(parade.keep["easy"], [True, False])
    np.testing.assert_array_equal(parade.keep["medium"], [True, True])
    np.testing.assert_array_equal(parade.keep["hard"], [True, True])
    empty = ground_truth["0--Parade/0_Parade_b_2"]
    assert empty.boxes.shape == (0, 4) and all(mask.shape == (0,) for mask in empty.keep.values())
    hand = ground_truth["1--Handshaking/1_Handshaking_c_3"]
    np.testing.assert_array_equal(hand.boxes, hand_boxes)
    assert all(mask.tolist() == [True] for mask in hand.keep.values())


def test_load_widerface_mat_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="wider_face_val.mat.*eval_tools.*ground_truth/"):
        load_widerface_mat(tmp_path)


def _sequential_reference(predictions, ground_truth, setting, num_thresholds=1000):
    """The protocol written out step by step with plain loops (slow, obviously sequential): the
    vectorised implementation must reproduce its counts exactly."""
    all_scores = np.concatenate([rows[:, 4] for rows in predictions.values()])
    low, high = all_scores.min(), all_scores.max()
    proposals_at = np.zeros(num_thresholds)
    recalled_at = np.zeros(num_thresholds)
    num_faces = 0
    for image_id, truth in ground_truth.items():
        keep = truth.keep[setting]
        num_faces += int(keep.sum())
        rows = predictions.get(image_id, np.zeros((0, 5)))
        rows = rows[np.argsort(-rows[:, 4], kind="stable")]
        scores = (rows[:, 4] - low) / (high - low)
        recalled = np.zeros(len(truth.boxes), dtype=bool)
        pred_recall, proposal = [], []
        for row in rows:
            counted = True
            if len(truth.boxes):
                overlaps = iou_matrix_plus_one(row[None, :4], truth.boxes)[0]
                best = int(np.argmax(overlaps))
                if overlaps[best] >= 0.5:
                    if not keep[best]:
                        counted = False
                    elif not recalled[best]:
                        recalled[best] = True
            pred_recall.append(int(recalled.sum()))
            proposal.append(1 if counted else 0)
        for k in range(num_thresholds):
            threshold = 1 - (k + 1) / num_thresholds
            passing = [i for i, score in enumerate(scores) if score >= threshold]
            if passing:
                last = passing[-1]
                proposals_at[k] += sum(proposal[: last + 1])
                recalled_at[k] += pred_recall[last]
    precision = np.divide(recalled_at, proposals_at, out=np.zeros(num_thresholds), where=proposals_at > 0)
    return precision, recalled_at / num_faces


def test_vectorised_counts_match_a_sequential_reference():
    # Random crowded images: overlapping faces, duplicates, ignored faces, empty images, tied scores.
    rng = np.random.default_rng(3)
    ground_truth, predictions = {}, {}
    for image in range(12):
        num_faces = int(rng.integers(0, 6))
        boxes = np.column_stack([rng.uniform(0, 60, (num_faces, 2)), rng.uniform(4, 40, (num_faces, 2))])
        ground_truth[f"e/{image}"] = ImageGroundTruth(boxes, keep_by_size(boxes, {"easy": 25, "medium": 12, "hard": 0}))
        if image % 5 == 4:
            continue  # no predictions for this image
        jittered = boxes[rng.integers(0, max(num_faces, 1), 8) % max(num_faces, 1)] if num_faces else np.zeros((0, 4))
        jittered = jittered + rng.normal(0, 3, jittered.shape)
        noise = np.column_stack([rng.uniform(0, 80, (3, 2)), rng.uniform(4, 40, (3, 2))])
        boxes_predicted = np.concatenate([jittered, noise])
        scores = np.round(rng.uniform(0, 1, len(boxes_predicted)), 2)  # rounding creates ties
        predictions[f"e/{image}"] = np.column_stack([boxes_predicted, scores])
    curves = widerface_evaluate(predictions, ground_truth)
    for setting in SETTINGS:
        precision, recall = _sequential_reference(predictions, ground_truth, setting)
        np.testing.assert_allclose(curves[setting].precision, precision, rtol=0, atol=1e-12)
        np.testing.assert_allclose(curves[setting].recall, recall, rtol=0, atol=1e-12)
        assert curves[setting].ap == pytest.approx(voc_average_precision(recall, precision), abs=1e-12)
