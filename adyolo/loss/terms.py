"""Loss terms: CIoU for boxes (torchvision), Wing for landmarks."""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_convert, complete_box_iou_loss


def ciou_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """1 - CIoU per pair of boxes [K, 4] (centre, size; any common unit) -> [K]."""
    return complete_box_iou_loss(
        box_convert(pred_cxcywh, "cxcywh", "xyxy"), box_convert(target_cxcywh, "cxcywh", "xyxy"), reduction="none"
    )


def wing_loss(pred: torch.Tensor, target: torch.Tensor, width: float = 10.0, curvature: float = 2.0) -> torch.Tensor:
    """Wing loss per element (Feng et al., CVPR 2018): logarithmic for small errors, so that small
    and medium landmark errors still pull, and linear past `width`. Continuous at |x| = width."""
    x = (pred - target).abs()
    linear_offset = width - width * math.log1p(width / curvature)
    return torch.where(x < width, width * torch.log1p(x / curvature), x - linear_offset)
