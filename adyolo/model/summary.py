"""What the detector costs: parameter count and GFLOPs, reported at start-up."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from adyolo.model.checkpoint import checkpointed_blocks


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


def describe(model: nn.Module, img_size: int) -> str:
    """One start-up line: variant, parameters, GFLOPs at `img_size`, checkpointed blocks."""
    cfg = model.cfg
    attention = f", attention={cfg.attention}" if cfg.fusion == "full" else ""
    blocks = checkpointed_blocks(model)
    return (
        f"ADYOLOv5-Face size={cfg.size} fusion={cfg.fusion}{attention}: "
        f"{count_parameters(model) / 1e6:.3f} M parameters, "
        f"{count_gflops(model, img_size):.2f} GFLOPs at {img_size}x{img_size}, "
        f"activation checkpointing: {', '.join(blocks) if blocks else 'off'}"
    )
