"""YOLOv5-Face detection head: per level a 1x1 conv to 3 anchors x (4 box + 1 obj + 10 landmark + classes).

Raw outputs stay in the network's parametrisation; `decode` turns them into pixels the way
YOLOv5-Face does:
    xy = (2 * sigmoid(t_xy) - 0.5 + cell) * stride      box centre
    wh = (2 * sigmoid(t_wh))^2 * anchor                 box size
    landmark = t_landmark * anchor + cell * stride      no sigmoid: points may leave their cell
    objectness, class scores = sigmoid
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from adyolo.layout import NUM_LANDMARKS, AnchorOutput

# YOLOv5's objectness prior: about this many objects per image at each level, at this input size.
PRIOR_OBJECTS_PER_LEVEL = 8
PRIOR_REFERENCE_PX = 640
# YOLOv5's class prior: the initial probability of the right class.
PRIOR_CLASS_PROBABILITY = 0.6


class DetectHead(nn.Module):
    """Features [B, C_i, H_i, W_i] for L levels (one per `in_channels` and `anchors` entry: 4 for the GD
    neck, 3 for yolov5face) -> L raw maps [B, 3, H_i, W_i, 15 + num_classes] (`AnchorOutput`)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, anchors: Sequence[Sequence[float]]):
        super().__init__()
        self.num_levels = len(in_channels)
        self.num_anchors = len(anchors[0]) // 2
        self.num_classes = num_classes
        self.num_outputs = AnchorOutput.CHANNELS_WITHOUT_CLASSES + num_classes
        # Derived from the config, so not part of the state dict.
        anchor_px = torch.tensor(anchors, dtype=torch.float32).view(self.num_levels, self.num_anchors, 2)
        self.register_buffer("anchors", anchor_px, persistent=False)  # [levels, anchors, 2] (w, h) pixels
        self.register_buffer("strides", torch.zeros(self.num_levels), persistent=False)  # set by the detector
        self.convs = nn.ModuleList(nn.Conv2d(c, self.num_anchors * self.num_outputs, 1) for c in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for conv, feature in zip(self.convs, features):
            b, _, h, w = feature.shape
            out = conv(feature).view(b, self.num_anchors, self.num_outputs, h, w)
            outputs.append(out.permute(0, 1, 3, 4, 2).contiguous())
        return outputs

    @torch.no_grad()
    def init_biases(self, reference_size: int = PRIOR_REFERENCE_PX) -> None:
        """YOLOv5 prior: about 8 objects per 640 px image at each level, class probability 0.6."""
        for conv, stride in zip(self.convs, self.strides.tolist()):
            bias = conv.bias.view(self.num_anchors, self.num_outputs)
            bias[:, AnchorOutput.OBJ] += math.log(PRIOR_OBJECTS_PER_LEVEL / (reference_size / stride) ** 2)
            # (YOLOv5: 0.99 rather than 1 keeps the one-class logarithm finite.)
            bias[:, AnchorOutput.CLASSES :] += math.log(PRIOR_CLASS_PROBABILITY / (self.num_classes - 0.99))

    def decode(self, raw: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw maps -> [B, sum(3 * H_i * W_i), 15 + num_classes] (`AnchorOutput`) in input pixels.

        Columns: cx, cy, w, h, objectness, 5 x (x, y) landmarks, class scores; float32.
        """
        decoded = []
        for level, pred in enumerate(raw):
            # In fp32 whatever the forward's precision: in bf16 (8 significant bits) a centre at 200 px
            # would be rounded to whole pixels, and at 640 px to 4, which small faces cannot afford.
            pred = pred.float()
            b, a, h, w, n = pred.shape
            stride = self.strides[level]
            anchor = self.anchors[level].view(1, a, 1, 1, 2).to(pred.dtype)
            ys, xs = torch.meshgrid(
                torch.arange(h, device=pred.device, dtype=pred.dtype),
                torch.arange(w, device=pred.device, dtype=pred.dtype),
                indexing="ij",
            )
            cell = torch.stack((xs, ys), dim=-1).view(1, 1, h, w, 2)
            xy = (pred[..., AnchorOutput.XY].sigmoid() * 2 - 0.5 + cell) * stride
            wh = (pred[..., AnchorOutput.WH].sigmoid() * 2) ** 2 * anchor
            points = pred[..., AnchorOutput.LANDMARKS].unflatten(-1, (NUM_LANDMARKS, 2))
            points = points * anchor.unsqueeze(-2) + (cell * stride).unsqueeze(-2)
            decoded.append(
                torch.cat(
                    [
                        xy,
                        wh,
                        pred[..., AnchorOutput.OBJ : AnchorOutput.OBJ + 1].sigmoid(),
                        points.flatten(-2),
                        pred[..., AnchorOutput.CLASSES :].sigmoid(),
                    ],
                    dim=-1,
                ).view(b, -1, n)
            )
        return torch.cat(decoded, dim=1)
