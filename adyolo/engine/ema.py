"""Exponential moving average of the weights (parameters and BatchNorm buffers), as in YOLOv5.

The EMA is a full fp32 copy of the bare detector on every rank. Under ZeRO-3 the live
parameters are partitioned outside forward, so reads go through `gather` (DeepSpeed's
GatheredParameters), which assembles them for the duration of the update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

GatherFn = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]


def _no_gather(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def zero3_gather(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """The `gather` for DeepSpeed ZeRO-3, whose parameters live partitioned outside forward."""
    import deepspeed  # only needed, and only importable cheaply, under DeepSpeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class ModelEMA:
    def __init__(
        self,
        fresh: nn.Module,
        model: nn.Module,
        decay: float = 0.9999,
        ramp: float = 2000.0,
        gather: GatherFn = _no_gather,
    ):
        """`fresh`: a newly built detector of the same config that becomes the EMA (a copy of a
        DeepSpeed-managed module would carry its hooks along); `model`: the live bare detector."""
        self.decay = decay
        self.ramp = ramp
        self.gather = gather
        self.updates = 0
        self.module = fresh.eval()  # built in fp32, whatever precision the training step runs in
        with gather(list(model.parameters())):
            self.module.load_state_dict(model.state_dict())
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        # Small decay early on, so the average is not dominated by the random initialisation.
        return self.decay * (1 - math.exp(-self.updates / self.ramp))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        with self.gather(list(model.parameters())):
            live = model.state_dict()
            averaged, counters = [], []
            for name, value in self.module.state_dict().items():
                (averaged if value.dtype.is_floating_point else counters).append((value, live[name].detach()))
            # One multi-tensor op per kind instead of two Python calls per tensor (the same arithmetic,
            # bit for bit: ema * d + live * (1 - d)).
            ema = [e for e, _ in averaged]
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, [v.to(e.dtype) for e, v in averaged], alpha=1 - d)
            for ema_value, value in counters:
                ema_value.copy_(value)  # num_batches_tracked

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
