"""WIDER FACE average precision, following the official evaluation protocol (eval_tools and its
widely used Python port), in NumPy.

The protocol differs from COCO/VOC matching in ways that change the numbers, so it is kept apart
from `coco_map`:

* Scores are min-max normalised over all predictions of the whole dataset, then swept over a fixed
  grid of 1000 thresholds t_k = 1 - (k + 1) / 1000 (k = 0..999).
* Boxes use the "+1 pixel" convention: a box x, y, w, h covers x..x+w inclusive, i.e. w + 1 pixels.
* There is no one-to-one matching: each prediction takes its best-IoU ground-truth face. A match to
  a face that does not count in the setting ("ignore" face) removes the prediction from the count;
  a second match to an already recalled face is a false positive.
* AP is the VOC all-point area under the resulting precision/recall curve.

The official ground truth (.mat files) is read by `ground_truth`, the official prediction files
(pred_dir/<event>/<image>.txt) by `prediction_files`.

Decisions where the official code is undefined (it would divide by zero) or stricter:

* Precision at a threshold with no proposals (0/0) is 0. Such a threshold also has recall 0 (a
  recalled face needs a counted proposal), and points at recall 0 never contribute area, so the
  choice does not affect AP.
* If every prediction has the same score (max == min) all normalised scores are 1, so every
  prediction passes every threshold.
* A setting with no faces that count in it over the whole dataset has recall 0 and AP NaN
  (undefined).
* Images in the ground truth but missing from the predictions count as images with no predictions
  (the official code would fail); their faces still lower recall.
* Images without ground-truth faces are evaluated too (the official port skips them; every official
  validation image has faces, so official numbers are unchanged): their predictions are false
  positives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SETTINGS = ("easy", "medium", "hard")
# A prediction and a face match when their IoU ("+1 pixel" convention) reaches this.
IOU_THRESHOLD = 0.5
# The official code sweeps the normalised score over this many thresholds.
NUM_THRESHOLDS = 1000


@dataclass
class ImageGroundTruth:
    """Ground-truth faces of one image."""

    boxes: np.ndarray  # [N, 4] x, y, w, h in pixels (float)
    keep: dict[str, np.ndarray]  # setting name -> [N] bool: faces that count in that setting


@dataclass
class PRCurve:
    """Dataset-level precision/recall over the score thresholds of one setting."""

    precision: np.ndarray  # [T] (T = num_thresholds, 1000 by default)
    recall: np.ndarray  # [T]
    thresholds: np.ndarray  # [T] normalised-score thresholds, descending
    ap: float  # VOC all-point AP of the curve; NaN when no face counts in the setting


@dataclass
class _ImageMatches:
    """Per-image quantities that do not depend on the setting (computed once, reused for each)."""

    best_gt: np.ndarray  # [M] int: index of the best-IoU ground-truth face of each prediction
    best_iou: np.ndarray  # [M] float: that IoU (-inf when the image has no faces)
    num_passing: np.ndarray  # [T] int: number of predictions with normalised score >= t_k


# ---------------------------------------------------------------------------------------------
# Evaluation


def iou_matrix_plus_one(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every box in `boxes_a` [M, 4] with every box in `boxes_b` [N, 4] (x, y, w, h, pixels)
    -> [M, N], with the official "+1 pixel" convention: x2 = x + w is inclusive, so the box is
    w + 1 pixels wide and two boxes touching at one edge overlap by one pixel column."""
    a = np.asarray(boxes_a, dtype=np.float64)[:, None, :]
    b = np.asarray(boxes_b, dtype=np.float64)[None, :, :]
    inter_w = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    inter_h = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    intersection = np.clip(inter_w, 0, None) * np.clip(inter_h, 0, None)
    area_a = (a[..., 2] + 1) * (a[..., 3] + 1)
    area_b = (b[..., 2] + 1) * (b[..., 3] + 1)
    union = area_a + area_b - intersection
    # Only degenerate boxes (w or h <= -1) give union <= 0; call their overlap 0, not NaN.
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def voc_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point AP of a curve given as recall [T] (non-decreasing) and precision [T]."""
    recall_points = np.concatenate(([0.0], recall, [1.0]))
    precision_points = np.concatenate(([0.0], precision, [0.0]))
    # Precision envelope: the best precision reachable at this recall or any higher one.
    precision_points = np.maximum.accumulate(precision_points[::-1])[::-1]
    steps = np.flatnonzero(recall_points[1:] != recall_points[:-1])
    return float(np.sum((recall_points[steps + 1] - recall_points[steps]) * precision_points[steps + 1]))


def score_thresholds(num_thresholds: int = NUM_THRESHOLDS) -> np.ndarray:
    """[T] descending thresholds t_k = 1 - (k + 1) / T, exactly as the official code computes them
    (the last one is 0, so every normalised score passes it)."""
    return 1 - (np.arange(num_thresholds) + 1) / num_thresholds


def widerface_evaluate(
    predictions: Mapping[str, np.ndarray],
    ground_truth: Mapping[str, ImageGroundTruth],
    settings: Sequence[str] = SETTINGS,
    iou_threshold: float = IOU_THRESHOLD,
    num_thresholds: int = NUM_THRESHOLDS,
) -> dict[str, PRCurve]:
    """WIDER FACE precision/recall curves and AP per setting.

    predictions: image id -> [M, 5] x, y, w, h, score (pixels; any score scale). Images of
        `ground_truth` missing here have no predictions. An id not in `ground_truth` is an error.
    ground_truth: image id -> faces [N, 4] and, per setting, the [N] mask of faces that count.
    Returns setting name -> PRCurve over `num_thresholds` normalised-score thresholds.
    """
    unknown = [image_id for image_id in predictions if image_id not in ground_truth]
    if unknown:
        raise ValueError(
            f"prediction for image {unknown[0]!r} which is not in the ground truth ({len(unknown)} unknown image id(s))"
        )
    thresholds = score_thresholds(num_thresholds)
    sorted_predictions = {
        image_id: _sorted_by_score(prediction_rows(image_id, predictions.get(image_id))) for image_id in ground_truth
    }
    score_min, score_range = _score_normalisation(sorted_predictions.values())

    proposals = {setting: np.zeros(num_thresholds, dtype=np.int64) for setting in settings}
    recalled = {setting: np.zeros(num_thresholds, dtype=np.int64) for setting in settings}
    num_faces = dict.fromkeys(settings, 0)
    for image_id, truth in ground_truth.items():
        boxes = _check_boxes(image_id, truth.boxes)
        image_predictions = sorted_predictions[image_id]
        normalised_scores = _normalise(image_predictions[:, 4], score_min, score_range)
        matches = _match_image(image_predictions[:, :4], normalised_scores, boxes, thresholds)
        for setting in settings:
            keep = _check_keep(image_id, truth, setting, len(boxes))
            num_faces[setting] += int(keep.sum())
            pred_recall, proposal = _walk_predictions(matches, keep, iou_threshold)
            _accumulate(matches.num_passing, pred_recall, proposal, proposals[setting], recalled[setting])

    return {
        setting: _curve(proposals[setting], recalled[setting], num_faces[setting], thresholds) for setting in settings
    }


def _sorted_by_score(predictions: np.ndarray) -> np.ndarray:
    """[M, 5] -> the same rows by descending score (stable, so equal scores keep file order)."""
    return predictions[np.argsort(-predictions[:, 4], kind="stable")]


def _score_normalisation(all_predictions) -> tuple[float, float]:
    """(min, max - min) of the scores over the whole dataset; range 0 when there is nothing to
    spread (no predictions, or all scores equal)."""
    scores = [predictions[:, 4] for predictions in all_predictions if len(predictions)]
    if not scores:
        return 0.0, 0.0
    scores = np.concatenate(scores)
    score_min = float(scores.min())
    return score_min, float(scores.max()) - score_min


def _normalise(scores: np.ndarray, score_min: float, score_range: float) -> np.ndarray:
    """[M] raw scores -> [M] in [0, 1]; with a zero range every score becomes 1 (see module doc)."""
    if score_range <= 0:
        return np.ones_like(scores)
    return (scores - score_min) / score_range


def _match_image(
    boxes: np.ndarray, normalised_scores: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray
) -> _ImageMatches:
    """Best-IoU face of each prediction ([M, 4] boxes sorted by descending score) and how many
    predictions pass each threshold."""
    num_predictions = len(boxes)
    if len(gt_boxes):
        overlaps = iou_matrix_plus_one(boxes, gt_boxes)  # [M, N]
        best_gt = overlaps.argmax(axis=1)  # first maximum on ties, like the official argmax
        best_iou = overlaps[np.arange(num_predictions), best_gt]
    else:
        best_gt = np.zeros(num_predictions, dtype=np.int64)
        best_iou = np.full(num_predictions, -np.inf)
    # Scores are descending, so their negatives ascend; the count of scores >= t is the insertion
    # point of -t to the right of equal values. All thresholds at once.
    num_passing = np.searchsorted(-normalised_scores, -thresholds, side="right")
    return _ImageMatches(best_gt=best_gt, best_iou=best_iou, num_passing=num_passing)


def _walk_predictions(matches: _ImageMatches, keep: np.ndarray, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The official sequential walk over predictions (descending score), vectorised.

    Returns pred_recall [M] (int: faces of `keep` [N] recalled by predictions 0..i) and
    proposal [M] (bool: False for predictions matched to an ignored face).

    The walk only ever marks kept faces as recalled, and a prediction recalls a new face exactly
    when it is the first (highest-scored) prediction whose best match is that kept face at
    IoU >= threshold; later ones are false positives. So the running count is a cumulative sum of
    first occurrences.
    """
    matched = matches.best_iou >= iou_threshold
    keep_of_best = keep[matches.best_gt] if len(keep) else np.zeros(len(matched), dtype=bool)
    hits = np.flatnonzero(matched & keep_of_best)
    _, first_of_each_face = np.unique(matches.best_gt[hits], return_index=True)
    newly_recalled = np.zeros(len(matched), dtype=np.int64)
    newly_recalled[hits[first_of_each_face]] = 1
    proposal = ~(matched & ~keep_of_best)
    return np.cumsum(newly_recalled), proposal


def _accumulate(
    num_passing: np.ndarray,
    pred_recall: np.ndarray,
    proposal: np.ndarray,
    proposals: np.ndarray,
    recalled: np.ndarray,
) -> None:
    """Add one image's counts at every threshold into `proposals` [T] and `recalled` [T] (in place):
    at threshold t_k the image contributes through its last prediction r with score >= t_k."""
    has_any = num_passing > 0
    last = num_passing[has_any] - 1
    proposals[has_any] += np.cumsum(proposal)[last]
    recalled[has_any] += pred_recall[last]


def _curve(proposals: np.ndarray, recalled: np.ndarray, num_faces: int, thresholds: np.ndarray) -> PRCurve:
    """Dataset-level counts [T] -> precision, recall and AP (0/0 precision is 0, see module doc)."""
    precision = np.divide(recalled, proposals, out=np.zeros(len(proposals), dtype=np.float64), where=proposals > 0)
    if num_faces == 0:
        return PRCurve(precision, np.zeros(len(proposals)), thresholds, float("nan"))
    recall = recalled / num_faces
    return PRCurve(precision, recall, thresholds, voc_average_precision(recall, precision))


def prediction_rows(image_id: str, predictions: np.ndarray | None) -> np.ndarray:
    """One image's predictions, None or [M, 5] x, y, w, h, score -> float64 [M, 5] ([0, 5] when empty);
    a ValueError naming the image for any other shape."""
    return _as_rows(image_id, predictions, 5, "predictions", "[M, 5] x y w h score")


def _check_boxes(image_id: str, boxes: np.ndarray) -> np.ndarray:
    """[N, 4] -> float64 [N, 4] ([0, 4] when empty)."""
    return _as_rows(image_id, boxes, 4, "ground truth", "[N, 4] x y w h")


def _as_rows(image_id: str, values: np.ndarray | None, columns: int, what: str, expected: str) -> np.ndarray:
    if values is None:
        return np.zeros((0, columns))
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.zeros((0, columns))
    if values.ndim != 2 or values.shape[1] != columns:
        raise ValueError(f"{what} of {image_id!r}: expected {expected}, got {values.shape}")
    return values


def _check_keep(image_id: str, truth: ImageGroundTruth, setting: str, num_boxes: int) -> np.ndarray:
    """The [N] bool keep mask of `setting`, checked against the number of faces."""
    if setting not in truth.keep:
        raise ValueError(f"ground truth of {image_id!r} has no keep mask for setting {setting!r}")
    keep = np.asarray(truth.keep[setting], dtype=bool).reshape(-1)
    if len(keep) != num_boxes:
        raise ValueError(
            f"ground truth of {image_id!r}: keep mask of {setting!r} has {len(keep)} entries for {num_boxes} faces"
        )
    return keep


def keep_by_size(boxes: np.ndarray, min_sizes: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Size-based difficulty for datasets without official lists: boxes [N, 4] x, y, w, h (pixels)
    -> setting -> [N] bool, True where min(w, h) >= that setting's min size, e.g.
    {"easy": 32, "medium": 16, "hard": 0}."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    smaller_side = np.minimum(boxes[:, 2], boxes[:, 3])
    return {setting: smaller_side >= min_size for setting, min_size in min_sizes.items()}
