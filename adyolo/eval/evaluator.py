"""Run a detector over a validation loader and score it: WIDER-style AP and a generic mAP@0.5.

`predict` runs on each rank's shard and returns plain NumPy per image (original image pixels);
the caller gathers those across ranks and calls `score` once. Nothing here knows about processes.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from adyolo.eval.coco_map import coco_map50
from adyolo.eval.postprocess import postprocess, unletterbox
from adyolo.eval.widerface_ap import ImageGroundTruth, PRCurve, keep_by_size, widerface_evaluate

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
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """-> per image (path, detections [K, 16] x1 y1 x2 y2 score landmarks cls, ground truth [N, 4] x y w h),
    all in the original image's pixels. `model` is the bare detector (e.g. the EMA copy)."""
    was_training = model.training
    model.eval()
    results = []
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        detections = detect_batch(model, images, autocast_dtype, conf_threshold, iou_threshold)
        targets = batch["targets"].cpu()
        for i, (dets, (ratio, pad_x, pad_y)) in enumerate(zip(detections, batch["letterbox"].tolist())):
            dets = unletterbox(dets.cpu(), ratio, pad_x, pad_y)
            faces = targets[targets[:, 0] == i]
            centre = (faces[:, 2:4] - torch.tensor([pad_x, pad_y])) / ratio
            size = faces[:, 4:6] / ratio
            gt = torch.cat([centre - size / 2, size], dim=1)
            results.append((batch["paths"][i], dets.numpy(), gt.numpy()))
    model.train(was_training)
    return results


@torch.no_grad()
def detect_batch(
    model: nn.Module,
    images: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    conf_threshold: float = 0.02,
    iou_threshold: float = 0.5,
) -> list[torch.Tensor]:
    """uint8 RGB network inputs [B, 3, S, S] on the model's device -> per image [K, 16] x1 y1 x2 y2
    score landmarks cls in those (letterboxed) pixels. The model's mode is the caller's."""
    amp = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with amp:
        raw = model(images.float() / 255)
    return postprocess(model.head.decode(raw), conf_threshold, iou_threshold)


def score(predictions: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[dict[str, float], dict[str, PRCurve]]:
    """Metrics from gathered `predict` outputs: ap_easy / ap_medium / ap_hard (WIDER protocol,
    size-based difficulty) and map50 (pycocotools), plus the PR curves for plotting."""
    by_image: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path, dets, gt in predictions:  # a sample padded onto a rank twice counts once
        by_image[path] = (dets, gt)
    pred_xywh = {k: _xywh_score(d) for k, (d, _) in by_image.items()}
    truth = {k: ImageGroundTruth(g, keep_by_size(g, SIZE_DIFFICULTY)) for k, (_, g) in by_image.items()}
    curves = widerface_evaluate(pred_xywh, truth)
    metrics = {f"ap_{name}": float(curve.ap) for name, curve in curves.items()}
    metrics["map50"] = float(coco_map50(pred_xywh, {k: g for k, (_, g) in by_image.items()}))
    return metrics, curves


def _xywh_score(dets: np.ndarray) -> np.ndarray:
    """[K, 16] x1 y1 x2 y2 score ... -> [K, 5] x y w h score."""
    out = np.zeros((len(dets), 5), np.float64)
    if len(dets):
        out[:, :2] = dets[:, :2]
        out[:, 2:4] = dets[:, 2:4] - dets[:, :2]
        out[:, 4] = dets[:, 4]
    return out
