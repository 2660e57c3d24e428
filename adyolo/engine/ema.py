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
Slot = tuple[dict, str]  # a module's `_parameters` or `_buffers` dict and the entry's name in it


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
        self._names = list(self.module.state_dict())
        self._own = _slots(self.module, self._names)
        # The live model, its parameters (for `gather`) and its slots, found at the first update.
        self._live: tuple[nn.Module, list[nn.Parameter], list[Slot]] | None = None
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
        if self._live is None or self._live[0] is not model:
            self._live = (model, list(model.parameters()), _slots(model, self._names))
        _, params, slots = self._live
        with self.gather(params):
            # The tensors are read from their modules at every update (a move may replace them); only
            # where to find them is kept. Two `state_dict()` calls and a `parameters()` walk per update
            # would do the same lookups again each time (a third of the update on a CPU).
            averaged, counters = [], []
            for (own, name), (live, live_name) in zip(self._own, slots, strict=True):
                ema_value, value = own[name], live[live_name].detach()
                (averaged if ema_value.dtype.is_floating_point else counters).append((ema_value, value))
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


def _slots(module: nn.Module, names: list[str]) -> list[Slot]:
    """Where each `state_dict` entry of `module` (named as in `names`) lives: its owner's parameter or
    buffer dict and its name there. Raises KeyError naming an entry the module does not have."""
    slots = []
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        owner = module.get_submodule(prefix)
        table = owner._parameters if leaf in owner._parameters else owner._buffers
        if table.get(leaf) is None:
            raise KeyError(f"{name}: not a parameter or buffer of {type(module).__name__}")
        slots.append((table, leaf))
    return slots
