"""Optimizer with YOLO parameter groups, and the per-step learning-rate / momentum schedule.

The schedule is a pure function of the optimizer step, so it needs no state of its own: the
trainer writes the values into the param groups before every backward (DeepSpeed steps inside
`backward`), and a resumed run picks up exactly where it stopped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adyolo.engine.config import OptimConfig

NOMINAL_BATCH = 64  # YOLOv5 scales weight decay by batch / 64
ADAMW_BETA2 = 0.999  # PyTorch's default; beta1 is `momentum`, as YOLOv5 does

# param_groups order produced by `build_optimizer`
DECAY, NO_DECAY, BIAS = 0, 1, 2


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """Three groups: conv/linear weights (with weight decay), BatchNorm weights and biases (without)."""
    decay, no_decay, bias = [], [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                bias.append(param)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                no_decay.append(param)
            else:
                decay.append(param)
    weight_decay = cfg.weight_decay * global_batch / NOMINAL_BATCH
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": bias, "weight_decay": 0.0},
    ]
    # PyTorch's fused kernels (CPU and CUDA) update all tensors in one pass, about 4x faster than one
    # tensor at a time on the size-n detector on a CPU (docs/measurements.md).
    if cfg.optimizer == "sgd":
        # Nesterov needs momentum; `momentum: 0` asks for plain SGD (torch would refuse Nesterov without it).
        nesterov = cfg.momentum > 0
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, ADAMW_BETA2), fused=True)


class Schedule:
    """Learning rate and momentum for optimizer step `step` (0-based).

    Warm-up (YOLOv5): over max(warmup_epochs x steps/epoch, warmup_min_steps) steps, weights and
    BatchNorm rise linearly from 0 to the epoch's rate, biases fall from `warmup_bias_lr`, SGD
    momentum rises from `warmup_momentum` (unless `momentum` is 0: none at all). The epoch's rate
    decays from lr to lr x final_lr_ratio (cosine or linear) and is constant within an epoch, as
    YOLO's per-epoch LambdaLR.
    """

    def __init__(self, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.warmup_steps = (
            max(round(cfg.warmup_epochs * steps_per_epoch), cfg.warmup_min_steps) if cfg.warmup_epochs else 0
        )

    def epoch_lr(self, epoch: int) -> float:
        cfg, progress = self.cfg, epoch / max(self.epochs - 1, 1)
        if cfg.schedule == "cosine":
            factor = (1 - math.cos(progress * math.pi)) / 2
        else:
            factor = progress
        return cfg.lr * (1 + (cfg.final_lr_ratio - 1) * factor)

    def values(self, step: int) -> tuple[list[float], float]:
        """-> (lr per param group [decay, no_decay, bias], momentum)."""
        target = self.epoch_lr(step // self.steps_per_epoch)
        if step >= self.warmup_steps:
            return [target] * 3, self.cfg.momentum
        t = step / self.warmup_steps
        lr = target * t
        bias_lr = self.cfg.warmup_bias_lr + (target - self.cfg.warmup_bias_lr) * t
        momentum = self.cfg.warmup_momentum + (self.cfg.momentum - self.cfg.warmup_momentum) * t
        if self.cfg.momentum == 0:  # momentum-free SGD (or AdamW with beta1 0) stays momentum-free in warm-up
            momentum = 0.0
        return [lr, lr, bias_lr], momentum

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Write step `step`'s values into `optimizer`; returns the weights' learning rate."""
        lrs, momentum = self.values(step)
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
            if "momentum" in group:
                group["momentum"] = momentum
            elif "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
        return lrs[DECAY]
