"""YOLOv5-Face backbone (yolov5s-face layout at any width/depth preset): C2..C5 at strides 4..32."""

from __future__ import annotations

import torch
from torch import nn

from adyolo.model.blocks import C3, SPP, ConvBN, StemBlock
from adyolo.model.checkpoint import run_block
from adyolo.model.config import scale_depth, scale_width


class Backbone(nn.Module):
    """[B,3,H,W] -> C2 [B,c2,H/4,W/4], C3 [B,c3,H/8,W/8], C4 [B,c4,H/16,W/16], C5 [B,c5,H/32,W/32].

    Channels at width 0.5 (size s): 64, 128, 256, 512.
    """

    def __init__(self, depth_multiple: float, width_multiple: float):
        super().__init__()

        def ch(c: int) -> int:
            return scale_width(c, width_multiple)

        def n(r: int) -> int:
            return scale_depth(r, depth_multiple)

        self.channels = (ch(128), ch(256), ch(512), ch(1024))
        c2, c3, c4, c5 = self.channels
        self.stem = StemBlock(3, ch(64))
        self.stage1 = C3(ch(64), c2, n(3))
        self.stage2 = nn.Sequential(ConvBN(c2, c3, 3, 2), C3(c3, c3, n(9)))
        self.stage3 = nn.Sequential(ConvBN(c3, c4, 3, 2), C3(c4, c4, n(9)))
        self.stage4 = nn.Sequential(ConvBN(c4, c5, 3, 2), SPP(c5, c5), C3(c5, c5, n(3), shortcut=False))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = run_block(self.stem, images)
        c2 = run_block(self.stage1, x)
        c3 = run_block(self.stage2, c2)
        c4 = run_block(self.stage3, c3)
        c5 = run_block(self.stage4, c4)
        return c2, c3, c4, c5
