"""The detector: YOLOv5-Face backbone + neck + landmark head. `build_model` builds it.

`model.neck` chooses the neck: `gd` (ADYOLOv5-Face: Gather-and-Distribute, 4 levels P2-P5, strides 4, 8,
16, 32) or `yolov5face` (the YOLOv5-Face baseline: PAN, 3 levels P3-P5, strides 8, 16, 32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adyolo.model.backbone import Backbone
from adyolo.model.checkpoint import enable_activation_checkpointing
from adyolo.model.config import ModelConfig
from adyolo.model.head import DetectHead
from adyolo.model.neck import GDNeck
from adyolo.model.pan import PANNeck
from adyolo.schema import from_mapping

# Size of the dummy forward that measures the output strides (any multiple of 32 works).
_STRIDE_PROBE_PX = 128


class ADYOLOFace(nn.Module):
    """images [B, 3, H, W] (H, W multiples of 32) -> one raw map [B, 3, H/s, W/s, 15 + num_classes]
    (`AnchorOutput`) per level, finest first: 4 levels at strides s = 4, 8, 16, 32 (`neck: gd`) or 3 at
    s = 8, 16, 32 (`neck: yolov5face`); `strides` and `cfg.strides` list them. The model never computes
    a loss; decoding is `head.decode`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg.depth_multiple, cfg.width_multiple)
        self.neck = GDNeck(self.backbone.channels, cfg) if cfg.neck == "gd" else PANNeck(self.backbone.channels, cfg)
        self.head = DetectHead(self.neck.out_channels, cfg.num_classes, cfg.anchors)
        self.head.strides.copy_(self._measure_strides())
        self.head.init_biases()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.neck(*self.backbone(images)))

    @property
    def strides(self) -> list[int]:
        return [int(s) for s in self.head.strides.tolist()]

    @torch.no_grad()
    def _measure_strides(self) -> torch.Tensor:
        was_training = self.training
        self.eval()  # no BatchNorm statistics from the probe
        probe = torch.zeros(1, 3, _STRIDE_PROBE_PX, _STRIDE_PROBE_PX)
        sizes = [f.shape[-2] for f in self.neck(*self.backbone(probe))]
        self.train(was_training)
        return torch.tensor([_STRIDE_PROBE_PX / s for s in sizes])


def build_model(cfg: ModelConfig | Mapping[str, Any] | None = None) -> ADYOLOFace:
    """The one way to build the detector, from the model section of a run config.

    `cfg` is a `ModelConfig`, or the section as a plain mapping (parsed YAML) whose missing keys take
    their defaults; bad keys or values raise `adyolo.schema.ConfigError` naming `model.<key>`.
    """
    cfg = from_mapping(ModelConfig, cfg, "model")
    model = ADYOLOFace(cfg)
    enable_activation_checkpointing(model, cfg.checkpointed_blocks)
    return model
