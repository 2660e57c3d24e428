"""YOLOv5-Face's PAN neck (`model.neck: yolov5face`): the baseline ADYOLOv5-Face is compared against.

The head of yolov5-face's models/yolov5s.yaml, layer for layer, at any width/depth preset (w, d):

    lateral5     ConvBN 1x1  C5 -> 512w                                       (stride 32)
    top_down_p4  nearest x2, concat C4, C3(512w + c4 -> 512w, 3d, no shortcut)  (stride 16)
    lateral4     ConvBN 1x1  -> 256w                                          (stride 16)
    top_down_p3  nearest x2, concat C3, C3(256w + c3 -> 256w, 3d, no shortcut)  = P3 (stride 8)
    bottom_up_p4 ConvBN 3x3 s2 (256w), concat lateral4, C3(-> 512w)            = P4 (stride 16)
    bottom_up_p5 ConvBN 3x3 s2 (512w), concat lateral5, C3(-> 1024w)           = P5 (stride 32)

Channels for size s at 640 px (B = batch): inputs C3 128x80^2, C4 256x40^2, C5 512x20^2 (C2 unused);
outputs P3 128x80^2, P4 256x40^2, P5 512x20^2. The four stages (the C3s with their resampling and
concat) can be checkpointed (`YOLOV5FACE_NECK_BLOCKS`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adyolo.model.blocks import C3, ConvBN
from adyolo.model.checkpoint import run_block
from adyolo.model.config import ModelConfig, scale_depth, scale_width


class TopDownStage(nn.Module):
    """Upsample the coarser map (nearest, x2), concat the backbone level, C3.

    coarser [B,c_coarser,H/2,W/2], level [B,c_level,H,W] -> [B,c_out,H,W]
    """

    def __init__(self, c_coarser: int, c_level: int, c_out: int, repeats: int):
        super().__init__()
        self.refine = C3(c_coarser + c_level, c_out, repeats, shortcut=False)

    def forward(self, coarser: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(coarser, scale_factor=2.0, mode="nearest")
        return self.refine(torch.cat([up, level], dim=1))


class BottomUpStage(nn.Module):
    """3x3 stride-2 ConvBN on the finer output, concat the same-level lateral, C3.

    finer [B,c_finer,2H,2W], lateral [B,c_lateral,H,W] -> [B,c_out,H,W]
    """

    def __init__(self, c_finer: int, c_lateral: int, c_out: int, repeats: int):
        super().__init__()
        self.down = ConvBN(c_finer, c_finer, 3, 2)
        self.refine = C3(c_finer + c_lateral, c_out, repeats, shortcut=False)

    def forward(self, finer: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
        return self.refine(torch.cat([self.down(finer), lateral], dim=1))


class PANNeck(nn.Module):
    """(C2, C3, C4, C5) -> (P3/8, P4/16, P5/32), channels `out_channels` (128, 256, 512 for size s).

    C2 [B,c2,H/4,W/4] is accepted (the backbone's outputs pass unchanged) and not used.
    """

    def __init__(self, backbone_channels: tuple[int, int, int, int], cfg: ModelConfig):
        super().__init__()
        _, c3, c4, c5 = backbone_channels

        def ch(c: int) -> int:
            return scale_width(c, cfg.width_multiple)

        repeats = scale_depth(3, cfg.depth_multiple)
        self.out_channels = (ch(256), ch(512), ch(1024))
        self.lateral5 = ConvBN(c5, ch(512), 1)
        self.top_down_p4 = TopDownStage(ch(512), c4, ch(512), repeats)
        self.lateral4 = ConvBN(ch(512), ch(256), 1)
        self.top_down_p3 = TopDownStage(ch(256), c3, ch(256), repeats)
        self.bottom_up_p4 = BottomUpStage(ch(256), ch(256), ch(512), repeats)
        self.bottom_up_p5 = BottomUpStage(ch(512), ch(512), ch(1024), repeats)

    def forward(
        self, c2: torch.Tensor, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        lateral5 = self.lateral5(c5)
        x = run_block(self.top_down_p4, lateral5, c4)
        lateral4 = self.lateral4(x)
        p3 = run_block(self.top_down_p3, lateral4, c3)
        p4 = run_block(self.bottom_up_p4, p3, lateral4)
        p5 = run_block(self.bottom_up_p5, p4, lateral5)
        return p3, p4, p5
