"""Generic single-class mAP@0.5 (COCO protocol via pycocotools) for any dataset in our format.

Unlike the WIDER FACE protocol (`widerface.protocol`) this needs no difficulty lists: every ground-truth
face counts, matching is COCO's greedy one-to-one matching at IoU >= 0.5, and AP is the 101-recall-point
interpolated precision. The COCO objects are built in memory; nothing is written to disk.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

FACE_CATEGORY = 1


def coco_map50(
    predictions: Mapping[str, np.ndarray],
    ground_truth: Mapping[str, np.ndarray],
    max_detections: int = 1000,
) -> float:
    """COCO AP at IoU 0.5, all areas, up to `max_detections` per image.

    predictions: image id -> [M, 5] x, y, w, h, score (pixels). Images of `ground_truth` missing
        here have no detections; an id not in `ground_truth` is a ValueError.
    ground_truth: image id -> [N, 4] x, y, w, h (pixels).
    Returns AP in [0, 1]; 0.0 when there are faces but no detections; NaN when there are no
    ground-truth faces at all (AP is undefined then; pycocotools would report -1).
    """
    unknown = [image_id for image_id in predictions if image_id not in ground_truth]
    if unknown:
        raise ValueError(
            f"prediction for image {unknown[0]!r} which is not in the ground truth ({len(unknown)} unknown image id(s))"
        )
    image_numbers = {image_id: number for number, image_id in enumerate(ground_truth, start=1)}
    annotations = _gt_annotations(ground_truth, image_numbers)
    if not annotations:
        return float("nan")
    detections = _detections(predictions, image_numbers)
    if not detections:
        return 0.0  # pycocotools' loadRes cannot take an empty list; nothing found -> AP 0

    # pycocotools prints progress; keep library code quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_truth = COCO()
        coco_truth.dataset = {
            "images": [{"id": number} for number in image_numbers.values()],
            "annotations": annotations,
            "categories": [{"id": FACE_CATEGORY, "name": "face"}],
        }
        coco_truth.createIndex()
        coco_detections = coco_truth.loadRes(detections)
        evaluation = COCOeval(coco_truth, coco_detections, iouType="bbox")
        # The default caps detections at 100 per image; WIDER images hold hundreds of faces.
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.params.iouThrs = np.array([0.5])
        evaluation.evaluate()
        evaluation.accumulate()
    return _ap_at_iou50(evaluation)


def _gt_annotations(ground_truth: Mapping[str, np.ndarray], image_numbers: Mapping[str, int]) -> list[dict]:
    """COCO annotation dicts for every face; ids start at 1 (pycocotools treats 0 as "no match")."""
    annotations = []
    for image_id, boxes in ground_truth.items():
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        for x, y, width, height in boxes.tolist():
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_numbers[image_id],
                    "category_id": FACE_CATEGORY,
                    "bbox": [x, y, width, height],
                    "area": width * height,
                    "iscrowd": 0,
                }
            )
    return annotations


def _detections(predictions: Mapping[str, np.ndarray], image_numbers: Mapping[str, int]) -> list[dict]:
    """COCO result dicts (loadRes assigns ids and areas)."""
    detections = []
    for image_id, rows in predictions.items():
        rows = np.asarray(rows, dtype=np.float64)
        if rows.size == 0:
            continue
        if rows.ndim != 2 or rows.shape[1] != 5:
            raise ValueError(f"predictions of {image_id!r}: expected [M, 5] x y w h score, got {rows.shape}")
        for x, y, width, height, score in rows.tolist():
            detections.append(
                {
                    "image_id": image_numbers[image_id],
                    "category_id": FACE_CATEGORY,
                    "bbox": [x, y, width, height],
                    "score": score,
                }
            )
    return detections


def _ap_at_iou50(evaluation: COCOeval) -> float:
    """AP from evaluation.eval["precision"] [T=1 IoU, R=101 recall points, K=1 class, A=4 areas,
    M=3 maxDets]: IoU 0.5, area "all" (index 0), the last maxDets (= max_detections). This is
    what summarize() reports as "AP @ IoU=0.50", read directly because summarize() prints and
    also asks for IoU 0.75, which is not evaluated here. Entries of -1 mark "no ground truth"."""
    precision = evaluation.eval["precision"][0, :, 0, 0, -1]
    defined = precision > -1
    if not defined.any():
        return float("nan")
    return float(precision[defined].mean())
