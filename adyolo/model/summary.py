"""What the detector costs: parameter count and GFLOPs, reported at start-up."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from adyolo.model.checkpoint import checkpointed_blocks, disable_activation_checkpointing


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, height: int, width: int | None = None) -> float:
    """GFLOPs (2 x multiply-accumulates) of one forward pass on one [3, height, width] image.

    Counted by `torch.utils.flop_counter` on a copy of the model on the meta device, so no memory
    is used and nothing runs. (On the meta device the counter also sees SDPA's matmuls, which it
    misses for the CPU flash kernel.)
    """
    probe = copy.deepcopy(model).to("meta").eval()
    image = torch.zeros(1, 3, height, width or height, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        probe(image)
    return counter.get_total_flops() / 1e9


def count_training_gflops(model: nn.Module, height: int, width: int | None = None) -> float:
    """GFLOPs of one training step's forward and backward on one [3, height, width] image, on the meta
    device like `count_gflops`. These are the model's FLOPs: blocks marked for activation checkpointing
    are counted once, not again for their recompute, so throughput in these units is comparable
    with checkpointing on and off."""
    probe = copy.deepcopy(model).to("meta").train()
    disable_activation_checkpointing(probe)
    # Two images: train-mode BatchNorm refuses one value per channel (a pooled 1x1 map of one image).
    images = torch.zeros(2, 3, height, width or height, device="meta")
    with FlopCounterMode(display=False) as counter:
        outputs = probe(images)
        sum(o.float().sum() for o in outputs).backward()
    return counter.get_total_flops() / 2e9


@dataclass(frozen=True)
class ModelSummary:
    """What the start-up report says about a detector."""

    variant: str  # e.g. "size=s fusion=full, attention=sdpa", "size=s neck=yolov5face"
    parameters: int
    gflops: float  # one image at img_size x img_size
    img_size: int
    checkpointed: tuple[str, ...]

    def __str__(self) -> str:
        name = "YOLOv5-Face" if "neck=yolov5face" in self.variant else "ADYOLOv5-Face"
        return (
            f"{name} {self.variant}: {self.parameters / 1e6:.3f} M parameters, "
            f"{self.gflops:.2f} GFLOPs at {self.img_size}x{self.img_size}, "
            f"activation checkpointing: {', '.join(self.checkpointed) if self.checkpointed else 'off'}"
        )


def summarize(model: nn.Module, img_size: int) -> ModelSummary:
    """Count once; print it (`str`) and log its fields."""
    cfg = model.cfg
    variant = f"size={cfg.size} " + ("neck=yolov5face" if cfg.neck == "yolov5face" else f"fusion={cfg.fusion}")
    if cfg.uses_attention:
        variant += f", attention={cfg.attention}"
    return ModelSummary(
        variant=variant,
        parameters=count_parameters(model),
        gflops=count_gflops(model, img_size),
        img_size=img_size,
        checkpointed=tuple(checkpointed_blocks(model)),
    )
