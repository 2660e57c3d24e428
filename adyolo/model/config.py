"""The model section of a run config: every architectural choice, with its default.

A run YAML states only what differs, e.g.

    model:
      size: s
      fusion: full        # full | efficient
      attention: sdpa     # sdpa | explicit (reference; materialises the N x N scores)
      checkpoint: [neck.low_fusion, backbone.stage1]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from adyolo.schema import ConfigError

# (depth multiple, width multiple) as in the YOLOv5 family; yolov5s-face is (0.33, 0.50).
SIZE_PRESETS: dict[str, tuple[float, float]] = {
    "n": (0.33, 0.25),
    "s": (0.33, 0.50),
    "m": (0.67, 0.75),
}

MAX_STRIDE = 32

# Anchors in input pixels (w, h pairs, three per level, strides 4, 8, 16, 32). These are the face-shaped
# anchors of YOLOv5-Face's P3-P6 models (yolov5s6-face: strides 8..64), moved down one level to
# P2..P5, so the smallest anchor (6 x 7 px) sits on the stride-4 map where small faces are found.
# The ADYOLOv5-Face paper does not state its anchors; these are an engineering choice (check the
# best-possible recall at anchor_t on a new dataset and re-cluster if it is low).
DEFAULT_ANCHORS: list[list[float]] = [
    [6, 7, 9, 11, 13, 16],
    [18, 23, 26, 33, 37, 47],
    [54, 67, 77, 104, 112, 154],
    [174, 238, 258, 355, 445, 568],
]

# Blocks that can run under activation checkpointing, named as in the state dict. The detector
# runs each of them through `adyolo.model.checkpoint.run_block`; tests check that every name here
# resolves to a submodule.
CHECKPOINTABLE_BLOCKS: tuple[str, ...] = (
    "backbone.stem",
    "backbone.stage1",
    "backbone.stage2",
    "backbone.stage3",
    "backbone.stage4",
    "neck.low_gather",
    "neck.low_fusion",
    "neck.low_distribute",
    "neck.inject_p4",
    "neck.inject_p3",
    "neck.inject_p2",
    "neck.high_gather",
    "neck.high_fusion",
    "neck.high_distribute",
    "neck.inject_n3",
    "neck.inject_n4",
    "neck.inject_n5",
)


@dataclass
class ModelConfig:
    size: Literal["n", "s", "m"] = "s"
    """Width/depth preset of the YOLOv5-Face backbone and the neck (n: 0.25/0.33, s: 0.5/0.33, m: 0.75/0.67)."""
    fusion: Literal["full", "efficient"] = "full"
    """Fusion at the two GD plug points: exact self-attention (`full`) or channel+spatial attention (`efficient`)."""
    attention: Literal["sdpa", "explicit"] = "sdpa"
    """How `full` computes attention: fused `scaled_dot_product_attention`, or matmul+softmax (reference)."""
    num_classes: int = 1
    """Object classes; faces are one class."""
    img_size: int = 640
    """Square training/report size in pixels; a multiple of 32 (the largest stride)."""
    low_stride: Literal[8, 16] = 8
    """Stride at which Low-GD gathers C2..C5 (8: 80x80 at 640 px, where `full` attends over 6400 tokens)."""
    high_stride: Literal[32, 64, 128] = 64
    """Stride at which High-GD gathers P2, P3, P4 and C5 (64: 10x10 at 640 px, as in Gold-YOLO)."""
    low_fusion_blocks: int = 1
    """Blocks at the low plug point."""
    high_fusion_blocks: int = 2
    """Blocks at the high plug point."""
    attention_heads: int = 4
    """Heads of the low-point self-attention; its channels must divide evenly."""
    drop_path: float = 0.1
    """Stochastic-depth rate reached by the last high-point block (rises linearly from 0)."""
    anchors: list[list[float]] = field(default_factory=lambda: [list(a) for a in DEFAULT_ANCHORS])
    """Anchor (w, h) pairs in input pixels: 4 levels (strides 4, 8, 16, 32) x 3 anchors."""
    checkpoint: list[str] | Literal["auto"] = field(default_factory=list)
    """Blocks recomputed in backward to save activation memory; names from CHECKPOINTABLE_BLOCKS, or ["all"].
    "auto": the least recompute that fits the memory budget, chosen by the run's memory plan."""

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError("num_classes", f"{self.num_classes} must be at least 1")
        if self.img_size < MAX_STRIDE or self.img_size % MAX_STRIDE:
            lower = max(MAX_STRIDE, self.img_size // MAX_STRIDE * MAX_STRIDE)
            raise ConfigError(
                "img_size",
                f"{self.img_size} is not a positive multiple of {MAX_STRIDE} (the largest stride); "
                f"use {lower} or {lower + MAX_STRIDE}",
            )
        for name in ("low_fusion_blocks", "high_fusion_blocks", "attention_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be at least 1")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError("drop_path", f"{self.drop_path} must be in [0, 1)")
        low_channels = self.low_channels
        if low_channels % self.attention_heads:
            raise ConfigError(
                "attention_heads",
                f"{self.attention_heads} does not divide the {low_channels} low-fusion channels of size "
                f"'{self.size}'; use a divisor such as 4",
            )
        if len(self.anchors) != 4 or any(len(level) != 6 for level in self.anchors):
            raise ConfigError(
                "anchors",
                "expected 4 levels (strides 4, 8, 16, 32) of 3 (w, h) pairs, i.e. 4 lists of 6 numbers",
            )
        if any(v <= 0 for level in self.anchors for v in level):
            raise ConfigError("anchors", "anchor sizes must be positive pixels")
        unknown = (
            []
            if self.checkpoint == "auto"
            else [n for n in self.checkpoint if n not in CHECKPOINTABLE_BLOCKS and n != "all"]
        )
        if unknown:
            raise ConfigError(
                "checkpoint",
                f"unknown block {unknown[0]!r}; use 'all' or names from: {', '.join(CHECKPOINTABLE_BLOCKS)}",
            )

    @property
    def depth_multiple(self) -> float:
        return SIZE_PRESETS[self.size][0]

    @property
    def width_multiple(self) -> float:
        return SIZE_PRESETS[self.size][1]

    @property
    def low_channels(self) -> int:
        """Channels at the low plug point (128 for size s)."""
        return scale_width(256, self.width_multiple)

    @property
    def checkpointed_blocks(self) -> tuple[str, ...]:
        if self.checkpoint == "auto":
            raise ConfigError(
                "checkpoint",
                "'auto' is chosen by a training run's memory plan (launch/train.py); building a model needs "
                "block names, [all] or []",
            )
        return CHECKPOINTABLE_BLOCKS if "all" in self.checkpoint else tuple(self.checkpoint)


def scale_width(channels: int, width_multiple: float, divisor: int = 8) -> int:
    """Channels of a width-scaled layer, rounded up to a multiple of `divisor` (YOLOv5's rule)."""
    return max(divisor, -(-int(channels * width_multiple) // divisor) * divisor)


def scale_depth(repeats: int, depth_multiple: float) -> int:
    """Repeats of a depth-scaled block (YOLOv5's rule: round, at least one)."""
    return max(round(repeats * depth_multiple), 1)
