"""Loss terms: CIoU for boxes, Wing for landmarks."""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_convert

EPS = 1e-7


def ciou_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """1 - CIoU per pair of boxes [K, 4] (centre, size; any common unit) -> [K].

    torchvision's `complete_box_iou_loss` computes the same values, but finds the intersecting pairs
    by boolean-mask indexing: a data-dependent shape, which makes every step wait for the GPU. Here
    the intersection is clamped at zero instead (equal values; tests/loss compares the two).
    """
    x1, y1, x2, y2 = box_convert(pred_cxcywh, "cxcywh", "xyxy").unbind(dim=-1)
    x1g, y1g, x2g, y2g = box_convert(target_cxcywh, "cxcywh", "xyxy").unbind(dim=-1)
    overlap_w = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0)
    overlap_h = (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    intersection = overlap_w * overlap_h
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection
    iou = intersection / (union + EPS)
    # Distance of the centres, over the diagonal of the smallest box enclosing both (DIoU).
    diagonal = (torch.max(x2, x2g) - torch.min(x1, x1g)) ** 2 + (torch.max(y2, y2g) - torch.min(y1, y1g)) ** 2 + EPS
    centre_distance = ((x1 + x2 - x1g - x2g) / 2) ** 2 + ((y1 + y2 - y1g - y2g) / 2) ** 2
    # Aspect-ratio consistency, weighted by alpha (a constant in the backward pass, as in the paper).
    v = (4 / math.pi**2) * (torch.atan((x2g - x1g) / (y2g - y1g)) - torch.atan((x2 - x1) / (y2 - y1))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + EPS)
    return 1 - iou + centre_distance / diagonal + alpha * v


def wing_loss(pred: torch.Tensor, target: torch.Tensor, width: float = 10.0, curvature: float = 2.0) -> torch.Tensor:
    """Wing loss per element (Feng et al., CVPR 2018): logarithmic for small errors, so that small
    and medium landmark errors still pull, and linear past `width`. Continuous at |x| = width."""
    x = (pred - target).abs()
    linear_offset = width - width * math.log1p(width / curvature)
    return torch.where(x < width, width * torch.log1p(x / curvature), x - linear_offset)
