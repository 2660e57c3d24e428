"""Run a detector over a validation loader and score it: WIDER-style AP and a generic mAP@0.5.

`predict` runs on each rank's shard and returns plain NumPy per image (original image pixels);
the caller gathers those across ranks and calls `score` (size-based difficulty) or `official_score`
(WIDER FACE's own lists) once. Nothing here knows about processes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from adyolo.eval.coco_map import coco_map50
from adyolo.eval.widerface.ground_truth import image_id
from adyolo.eval.widerface.protocol import SETTINGS, ImageGroundTruth, PRCurve, keep_by_size, widerface_evaluate
from adyolo.layout import DetectionRow, TargetRow
from adyolo.predict.detector import detect_batch
from adyolo.predict.postprocess import unletterbox
from adyolo.progress import Progress

# One image's evaluation record: (path, detections [K, 16] `DetectionRow`, ground truth [N, 4] x y w h),
# in the original image's pixels.
Prediction = tuple[str, np.ndarray, np.ndarray]

# Without official difficulty lists (synthetic or custom data) a face counts in a setting when its
# smaller side reaches this many pixels in the original image. "hard" counts every face.
SIZE_DIFFICULTY = {"easy": 32.0, "medium": 16.0, "hard": 0.0}


@torch.no_grad()
def predict(
    model: nn.Module,
    loader,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    conf_threshold: float = 0.02,
    iou_threshold: float = 0.5,
    progress: bool = False,
    stop: Callable[[], bool] | None = None,
) -> list[Prediction] | None:
    """-> per image (path, detections [K, 16] `DetectionRow`, ground truth [N, 4] x y w h), all in the
    original image's pixels. `model` is the bare detector (e.g. the EMA copy). `progress`: a progress
    bar (with ETA) that disappears when done. `stop`: asked after every batch; when it says True the
    evaluation ends at once and returns None."""
    was_training = model.training
    model.eval()
    results = []
    for batch in Progress(loader, desc="validate", unit="batch", leave=False, disable=not progress):
        images = batch["images"].to(device, non_blocking=True)
        detections = detect_batch(model, images, autocast_dtype, conf_threshold, iou_threshold)
        targets = batch["targets"].cpu()
        for i, (dets, (ratio, pad_x, pad_y)) in enumerate(zip(detections, batch["letterbox"].tolist())):
            dets = unletterbox(dets.cpu(), ratio, pad_x, pad_y)
            faces = targets[targets[:, TargetRow.IMAGE] == i]
            centre = (faces[:, TargetRow.CENTRE] - torch.tensor([pad_x, pad_y])) / ratio
            size = faces[:, TargetRow.SIZE] / ratio
            gt = torch.cat([centre - size / 2, size], dim=1)
            results.append((batch["paths"][i], dets.numpy(), gt.numpy()))
        if stop is not None and stop():
            results = None
            break
    model.train(was_training)
    return results


def score(predictions: list[Prediction]) -> tuple[dict[str, float], dict[str, PRCurve]]:
    """Metrics from gathered `predict` outputs: ap_easy / ap_medium / ap_hard (WIDER protocol,
    size-based difficulty) and map50 (pycocotools), plus the PR curves for plotting."""
    by_image = _unique(predictions)
    pred_xywh = {k: xywh_score(d) for k, (d, _) in by_image.items()}
    truth = {k: ImageGroundTruth(g, keep_by_size(g, SIZE_DIFFICULTY)) for k, (_, g) in by_image.items()}
    curves = widerface_evaluate(pred_xywh, truth)
    metrics = {f"ap_{name}": float(curve.ap) for name, curve in curves.items()}
    metrics["map50"] = float(coco_map50(pred_xywh, {k: g for k, (_, g) in by_image.items()}))
    return metrics, curves


def official_score(
    predictions: list[Prediction], truth: dict[str, ImageGroundTruth]
) -> tuple[dict[str, float], dict[str, PRCurve]]:
    """ap_easy / ap_medium / ap_hard against the official WIDER FACE lists (`load_widerface_mat`); the
    images are matched by their official id "<event>/<file stem>". Raises ValueError naming an image the
    ground truth does not hold (a silently lower recall would be worse)."""
    pred_xywh = {}
    for path, (dets, _) in _unique(predictions).items():
        key = image_id(path)
        if key not in truth:
            raise ValueError(f"image {path} (id {key}) is not in the official ground truth")
        pred_xywh[key] = xywh_score(dets)
    curves = widerface_evaluate(pred_xywh, {k: truth[k] for k in pred_xywh})
    return {f"ap_{name}": float(curve.ap) for name, curve in curves.items()}, curves


def face_counts(predictions: list[Prediction]) -> dict[str, int]:
    """Faces that count in each setting (size-based difficulty)."""
    counts = dict.fromkeys(SETTINGS, 0)
    for _, gt in _unique(predictions).values():
        for name, keep in keep_by_size(gt, SIZE_DIFFICULTY).items():
            counts[name] += int(keep.sum())
    return counts


def official_predictions(predictions: list[Prediction]) -> dict[str, np.ndarray]:
    """Official image id -> [K, 5] x y w h score, as WIDER FACE's prediction files hold them."""
    return {image_id(path): xywh_score(dets) for path, (dets, _) in _unique(predictions).items()}


def xywh_score(dets: np.ndarray) -> np.ndarray:
    """[K, 16] `DetectionRow` -> [K, 5] x y w h score (what both AP protocols take)."""
    out = np.zeros((len(dets), 5), np.float64)
    if len(dets):
        out[:, :2] = dets[:, DetectionRow.CORNER_1]
        out[:, 2:4] = dets[:, DetectionRow.CORNER_2] - dets[:, DetectionRow.CORNER_1]
        out[:, 4] = dets[:, DetectionRow.SCORE]
    return out


def _unique(predictions: list[Prediction]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """path -> (detections, ground truth); a sample padded onto a rank twice (gathered from every
    rank) counts once."""
    return {path: (dets, gt) for path, dets, gt in predictions}
