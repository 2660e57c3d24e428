"""From decoded head outputs to detections: confidence filter, then NMS (torchvision's batched_nms)."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_convert

OBJ, LANDMARKS, CLASSES = 4, slice(5, 15), 15


def postprocess(
    decoded: torch.Tensor,
    conf_threshold: float = 0.02,
    iou_threshold: float = 0.5,
    max_detections: int = 1000,
) -> list[torch.Tensor]:
    """decoded [B, N, 15 + C] (cx, cy, w, h, objectness, 10 landmark coordinates, class scores; pixels,
    as from `DetectHead.decode`) -> per image [K, 16]: x1, y1, x2, y2, score, 10 landmark coordinates,
    class, sorted by descending score.

    With one class the score is the objectness alone: the loss never trains the class output then
    (YOLOv5-Face), so multiplying it in would only add noise. With more classes the score is
    objectness x class probability of the best class. NMS runs per class.
    """
    num_classes = decoded.shape[-1] - CLASSES
    results = []
    for pred in decoded.float():
        if num_classes > 1:
            cls_score, cls = pred[:, CLASSES:].max(dim=1)
            score = pred[:, OBJ] * cls_score
        else:
            score, cls = pred[:, OBJ], torch.zeros(len(pred), dtype=torch.long, device=pred.device)
        keep = score > conf_threshold
        boxes = box_convert(pred[keep, :4], "cxcywh", "xyxy")
        score, cls, points = score[keep], cls[keep], pred[keep, LANDMARKS]
        kept = batched_nms(boxes, score, cls, iou_threshold)[:max_detections]  # sorted by score
        results.append(torch.cat([boxes[kept], score[kept, None], points[kept], cls[kept, None].float()], dim=1))
    return results


def unletterbox(detections: torch.Tensor, ratio: float, pad_x: float, pad_y: float) -> torch.Tensor:
    """Map [K, 16] detections from letterboxed pixels back to the original image's pixels."""
    out = detections.clone()
    coords = torch.cat([out[:, 0:4], out[:, 5:15]], dim=1).view(len(out), 7, 2)  # 2 box corners + 5 points
    coords = (coords - coords.new_tensor([pad_x, pad_y])) / ratio
    flat = coords.reshape(len(out), 14)
    out[:, 0:4], out[:, 5:15] = flat[:, :4], flat[:, 4:]
    return out
