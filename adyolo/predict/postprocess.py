"""From decoded head outputs to detections: confidence filter, then NMS (torchvision's batched_nms)."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_convert

from adyolo.layout import NUM_LANDMARKS, AnchorOutput, DetectionRow

# At most this many detections per image after NMS: a flood of low-score boxes (an untrained model at a
# low threshold) cannot blow up evaluation time or memory, and real images hold far fewer faces.
MAX_DETECTIONS = 1000


def postprocess(
    decoded: torch.Tensor,
    conf_threshold: float = 0.02,
    iou_threshold: float = 0.5,
    max_detections: int = MAX_DETECTIONS,
) -> list[torch.Tensor]:
    """decoded [B, N, 15 + C] (`AnchorOutput`: cx, cy, w, h, objectness, 10 landmark coordinates, class
    scores; pixels, as from `DetectHead.decode`) -> per image [K, 16] (`DetectionRow`: x1, y1, x2, y2,
    score, 10 landmark coordinates, class), sorted by descending score.

    With one class the score is the objectness alone: the loss never trains the class output then
    (YOLOv5-Face), so multiplying it in would only add noise. With more classes the score is
    objectness x class probability of the best class. NMS runs per class.
    """
    num_classes = decoded.shape[-1] - AnchorOutput.CLASSES
    results = []
    for pred in decoded.float():
        if num_classes > 1:
            cls_score, cls = pred[:, AnchorOutput.CLASSES :].max(dim=1)
            score = pred[:, AnchorOutput.OBJ] * cls_score
        else:
            score, cls = pred[:, AnchorOutput.OBJ], torch.zeros(len(pred), dtype=torch.long, device=pred.device)
        keep = score > conf_threshold
        boxes = box_convert(pred[keep, AnchorOutput.BOX], "cxcywh", "xyxy")
        score, cls, points = score[keep], cls[keep], pred[keep, AnchorOutput.LANDMARKS]
        kept = batched_nms(boxes, score, cls, iou_threshold)[:max_detections]  # sorted by score
        results.append(torch.cat([boxes[kept], score[kept, None], points[kept], cls[kept, None].float()], dim=1))
    return results


def unletterbox(detections: torch.Tensor, ratio: float, pad_x: float, pad_y: float) -> torch.Tensor:
    """Map [K, 16] detections (`DetectionRow`) from letterboxed pixels back to the original image's pixels."""
    out = detections.clone()
    points = 2 + NUM_LANDMARKS  # 2 box corners + 5 landmarks
    coords = torch.cat([out[:, DetectionRow.BOX], out[:, DetectionRow.LANDMARKS]], dim=1).view(len(out), points, 2)
    coords = (coords - coords.new_tensor([pad_x, pad_y])) / ratio
    flat = coords.reshape(len(out), 2 * points)
    out[:, DetectionRow.BOX], out[:, DetectionRow.LANDMARKS] = flat[:, :4], flat[:, 4:]
    return out
