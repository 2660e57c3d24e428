"""The model section of a run config: every architectural choice, with its default.

A run YAML states only what differs, e.g.

    model:
      size: s
      neck: gd            # gd | yolov5face (the YOLOv5s-face baseline: PAN neck, 3 levels)
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
# YOLOv5-Face's own anchors of its P3-P5 models (yolov5s-face.yaml), strides 8, 16, 32.
YOLOV5FACE_ANCHORS: list[list[float]] = [
    [4, 5, 8, 10, 13, 16],
    [23, 29, 43, 55, 73, 105],
    [146, 217, 231, 300, 335, 433],
]

# The detection levels' strides and default anchors of each neck.
LEVEL_STRIDES: dict[str, tuple[int, ...]] = {"gd": (4, 8, 16, 32), "yolov5face": (8, 16, 32)}
NECK_ANCHORS: dict[str, list[list[float]]] = {"gd": DEFAULT_ANCHORS, "yolov5face": YOLOV5FACE_ANCHORS}

# Blocks that can run under activation checkpointing, named as in the state dict. The detector
# runs each of them through `adyolo.model.checkpoint.run_block`; tests check that every name here
# resolves to a submodule. The backbone's blocks are valid with either neck.
BACKBONE_BLOCKS: tuple[str, ...] = (
    "backbone.stem",
    "backbone.stage1",
    "backbone.stage2",
    "backbone.stage3",
    "backbone.stage4",
)
GD_NECK_BLOCKS: tuple[str, ...] = (
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
# The PAN neck's four stages (upsample or strided conv, concat, C3): `adyolo.model.pan`.
YOLOV5FACE_NECK_BLOCKS: tuple[str, ...] = (
    "neck.top_down_p4",
    "neck.top_down_p3",
    "neck.bottom_up_p4",
    "neck.bottom_up_p5",
)
CHECKPOINTABLE_BLOCKS_BY_NECK: dict[str, tuple[str, ...]] = {
    "gd": BACKBONE_BLOCKS + GD_NECK_BLOCKS,
    "yolov5face": BACKBONE_BLOCKS + YOLOV5FACE_NECK_BLOCKS,
}
# The default (GD) detector's blocks.
CHECKPOINTABLE_BLOCKS: tuple[str, ...] = CHECKPOINTABLE_BLOCKS_BY_NECK["gd"]


@dataclass
class ModelConfig:
    size: Literal["n", "s", "m"] = "s"
    """Width/depth preset of the YOLOv5-Face backbone and the neck (n: 0.25/0.33, s: 0.5/0.33, m: 0.75/0.67)."""
    neck: Literal["gd", "yolov5face"] = "gd"
    """`gd`: ADYOLOv5-Face, the Gather-and-Distribute neck with 4 levels P2-P5 (strides 4, 8, 16, 32).
    `yolov5face`: the YOLOv5-Face baseline (yolov5s-face at size s), its PAN neck with 3 levels P3-P5
    (strides 8, 16, 32) on the same backbone; it ignores fusion, attention, low_stride, high_stride,
    low_fusion_blocks, high_fusion_blocks, attention_heads and drop_path (GD settings)."""
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
    anchors: list[list[float]] | None = None
    """Anchor (w, h) pairs in input pixels, 3 per level: for `gd` 4 levels (strides 4, 8, 16, 32), for
    `yolov5face` 3 (strides 8, 16, 32). Unset: the neck's defaults (DEFAULT_ANCHORS, YOLOV5FACE_ANCHORS),
    written into the config here, so a saved config holds the anchors it trained with (to change the neck
    of a built config, `dataclasses.replace(cfg, neck=..., anchors=None)`)."""
    checkpoint: list[str] | Literal["auto"] = field(default_factory=list)
    """Blocks recomputed in backward to save activation memory; names from the neck's
    CHECKPOINTABLE_BLOCKS_BY_NECK (backbone blocks for both), or ["all"].
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
        if self.neck == "gd" and low_channels % self.attention_heads:
            raise ConfigError(
                "attention_heads",
                f"{self.attention_heads} does not divide the {low_channels} low-fusion channels of size "
                f"'{self.size}'; use a divisor such as 4",
            )
        if self.anchors is None:
            self.anchors = [list(level) for level in NECK_ANCHORS[self.neck]]
        levels, strides = self.num_levels, ", ".join(map(str, self.strides))
        if len(self.anchors) != levels or any(len(level) != 6 for level in self.anchors):
            raise ConfigError(
                "anchors",
                f"expected {levels} levels (strides {strides}) for neck '{self.neck}', of 3 (w, h) pairs each, "
                f"i.e. {levels} lists of 6 numbers (got {len(self.anchors)} lists of "
                f"{', '.join(str(len(level)) for level in self.anchors) or 'nothing'})",
            )
        if any(v <= 0 for level in self.anchors for v in level):
            raise ConfigError("anchors", "anchor sizes must be positive pixels")
        valid = self.checkpointable_blocks
        unknown = [] if self.checkpoint == "auto" else [n for n in self.checkpoint if n not in valid and n != "all"]
        if unknown:
            raise ConfigError(
                "checkpoint",
                f"unknown block {unknown[0]!r} for neck '{self.neck}'; use 'all' or names from: {', '.join(valid)}",
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
    def strides(self) -> tuple[int, ...]:
        """Strides of the detection levels, finest first: (4, 8, 16, 32) for `gd`, (8, 16, 32) for `yolov5face`."""
        return LEVEL_STRIDES[self.neck]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def coarsest_stride(self) -> int:
        """Stride of the smallest map anywhere in the network (GD: High-GD's gather, at least 32)."""
        return max(self.high_stride, MAX_STRIDE) if self.neck == "gd" else MAX_STRIDE

    @property
    def uses_attention(self) -> bool:
        """Whether the network holds the `full` fusion's self-attention (GD only)."""
        return self.neck == "gd" and self.fusion == "full"

    @property
    def variant(self) -> str:
        """What the detector is, in one word: `yolov5face`, `efficient` or `full/sdpa`, `full/explicit`."""
        if self.neck == "yolov5face":
            return "yolov5face"
        return f"full/{self.attention}" if self.fusion == "full" else self.fusion

    @property
    def checkpointable_blocks(self) -> tuple[str, ...]:
        """The block names `checkpoint` takes with this neck."""
        return CHECKPOINTABLE_BLOCKS_BY_NECK[self.neck]

    @property
    def checkpointed_blocks(self) -> tuple[str, ...]:
        if self.checkpoint == "auto":
            raise ConfigError(
                "checkpoint",
                "'auto' is chosen by a training run's memory plan (launch/train.py); building a model needs "
                "block names, [all] or []",
            )
        return self.checkpointable_blocks if "all" in self.checkpoint else tuple(self.checkpoint)


def scale_width(channels: int, width_multiple: float, divisor: int = 8) -> int:
    """Channels of a width-scaled layer, rounded up to a multiple of `divisor` (YOLOv5's rule)."""
    return max(divisor, -(-int(channels * width_multiple) // divisor) * divisor)


def scale_depth(repeats: int, depth_multiple: float) -> int:
    """Repeats of a depth-scaled block (YOLOv5's rule: round, at least one)."""
    return max(round(repeats * depth_multiple), 1)
