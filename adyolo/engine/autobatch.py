"""`train.micro_batch: auto`: the largest micro-batch whose training step fits the GPU.

Candidates are the divisors of the per-rank batch, largest first, so the global batch stays
exact and accumulation makes up the rest. Each probe runs a real forward, loss and backward at
that size with 10% of the memory held back for the optimizer state, EMA and fragmentation.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch

from adyolo.loss.criterion import DetectionLoss
from adyolo.model import build_model

HEADROOM = 0.9


def largest_fitting(candidates: Sequence[int], fits: Callable[[int], None]) -> int:
    """The first candidate for which `fits` returns without a CUDA out-of-memory error."""
    for micro in candidates:
        try:
            fits(micro)
            return micro
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
    raise RuntimeError(
        f"not even a micro-batch of {candidates[-1]} fits this GPU; lower model.img_size or model.size, "
        f"or enable model.checkpoint=[all]"
    )


def probe_step(model_cfg, loss_cfg, img_size: int, precision: str, device: torch.device) -> Callable[[int], None]:
    """A function that runs one training step of `model_cfg` at a given micro-batch on `device`."""

    def fits(micro: int) -> None:
        torch.cuda.set_per_process_memory_fraction(HEADROOM, device)
        try:
            model = build_model(model_cfg).to(device).train()
            loss_fn = DetectionLoss(loss_cfg, model.head.anchors, model.head.strides, model_cfg.num_classes)
            images = torch.rand(micro, 3, img_size, img_size, device=device)
            # Faces at every scale in every image, so the loss takes its full path.
            sizes = torch.tensor([8.0, 24.0, 64.0, 160.0], device=device).clamp(max=img_size / 2)
            targets = torch.zeros(micro * len(sizes), 16, device=device)
            targets[:, 0] = torch.arange(micro, device=device).repeat_interleave(len(sizes)).float()
            targets[:, 2:4] = img_size / 2
            targets[:, 4] = targets[:, 5] = sizes.repeat(micro)
            targets[:, 6:] = img_size / 2
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                raw = model(images)
            loss_fn(raw, targets)["total"].backward()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()

    return fits
