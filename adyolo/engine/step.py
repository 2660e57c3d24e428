"""The training step, written once: what the trainer trains, the benchmark times and the micro-batch
probe measures.

One optimizer step is a window of `accumulation` micro-batches. Each micro-batch: write the
schedule's learning rate and momentum, forward, loss, the all-rank check that the loss is finite,
backward (accumulating). At the window's end: clip the gradient norm, step the optimizer (or skip
the step if the norm is not finite), update the EMA. Under DeepSpeed, clipping and the optimizer step
happen inside `backward`, as its JSON says.

With an `Accelerator` the step runs on the prepared (DDP / DeepSpeed / bare) model, and mixed
precision is the wrapper's. Without one (`accelerator=None`) it runs a bare model in this process
alone, one micro-batch per window, in the autocast it is given: the micro-batch probe runs it so,
before any Accelerator exists.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from adyolo.engine.ema import ModelEMA
from adyolo.engine.optim import Schedule
from adyolo.engine.phases import PhaseTimes
from adyolo.loss.criterion import DetectionLoss

LOSS_TERMS = ("box", "obj", "cls", "landmark")


@dataclass
class Window:
    """One optimizer step's micro-batches: loss sums, images, wall time and what happened."""

    start: float = field(default_factory=time.perf_counter)
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_TERMS, 0.0))
    micro: int = 0  # micro-batches whose loss was finite (and went through backward)
    images: int = 0
    skipped: set[int] = field(default_factory=set)  # indices of unreadable images met in this window's batches
    stepped: bool = False  # the optimizer changed the weights
    nonfinite: bool = False  # a micro-batch (or the step) was skipped for a non-finite value
    lr: float = 0.0  # the weights' learning rate of this step

    def add(self, losses: dict[str, torch.Tensor], images: int, skipped: list[int]) -> None:
        for k in LOSS_TERMS:
            self.sums[k] += float(losses[k])
        self.micro += 1
        self.images += images
        self.skipped.update(skipped)

    def mean_losses(self) -> dict[str, float]:
        n = max(self.micro, 1)
        means = {k: v / n for k, v in self.sums.items()}
        means["total"] = sum(means.values())
        return means

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def postfix(self) -> str:
        losses = self.mean_losses()
        return " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "cls") + f" | {self.images_per_s():.1f} img/s"


@dataclass(frozen=True)
class MicroStep:
    """What one call of `TrainStep` did."""

    window_ended: bool  # the accumulation window is over: the optimizer stepped, or skipped its step
    nonfinite: bool  # this micro-batch was skipped (non-finite loss), or the window's step (non-finite norm)


class _ThisProcess:
    """The few things the step asks of an Accelerator, for a bare model in one process: gradients of
    one micro-batch, nothing to synchronise, plain `backward` and `clip_grad_norm_`."""

    num_processes = 1
    sync_gradients = True

    def accumulate(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model


class TrainStep:
    """Call it with each micro-batch (images uint8 [B, 3, H, W], targets [M, 16] `TargetRow`, on the device).

    `model`, `optimizer`: prepared by `accelerator` (or bare, without one). `grad_clip` 0 means no
    clipping (under DeepSpeed the JSON clips). `ema`, when given, is updated after every optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: DetectionLoss,
        schedule: Schedule,
        *,
        grad_clip: float,
        ema: ModelEMA | None = None,
        channels_last: bool = False,
        accelerator: Accelerator | None = None,
        autocast_dtype: torch.dtype | None = None,
        phases: PhaseTimes | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.grad_clip = grad_clip
        self.ema = ema
        self.channels_last = channels_last
        self.acc = accelerator if accelerator is not None else _ThisProcess()
        self.deepspeed = accelerator is not None and accelerator.distributed_type.name == "DEEPSPEED"
        if accelerator is not None and autocast_dtype is not None:
            raise ValueError("with an Accelerator, mixed precision is the Accelerator's (or DeepSpeed's) to apply")
        self.autocast_dtype = autocast_dtype
        self.phases = phases if phases is not None else PhaseTimes(enabled=False)
        # Found once: Accelerate's `unwrap_model` and `parameters()` cost about 5 and 3 ms a step on
        # the size-n detector on a 2-core CPU, and neither the wrapper nor the parameters change.
        self.bare = self.acc.unwrap_model(model)
        self.params = list(model.parameters())

    def __call__(self, batch: dict, window: Window, step: int) -> MicroStep:
        """Train on one micro-batch of optimizer step `step` (0-based, for the schedule)."""
        nonfinite = self._forward_backward(batch, window, step)
        if not self.acc.sync_gradients:
            return MicroStep(window_ended=False, nonfinite=nonfinite)
        if window.stepped:
            if self.ema is not None:
                with self.phases("optimizer"):
                    self.ema.update(self.bare)
        elif not self.deepspeed:
            # The window's last micro-batch was skipped: drop the window's gradients. (DeepSpeed keeps
            # them and adds them to the next window's step.)
            self.optimizer.zero_grad(set_to_none=True)
        return MicroStep(window_ended=True, nonfinite=nonfinite)

    def weight_bytes(self) -> int:
        """Bytes of the weights and buffers this step keeps alive between steps: the model's and the
        EMA's (the memory plan tells them apart from a process's other memory)."""
        modules = [self.bare, *([self.ema.module] if self.ema is not None else [])]
        return sum(t.nbytes for m in modules for t in (*m.parameters(), *m.buffers()))

    def run_window(self, batches: Iterator[dict], step: int) -> Window:
        """Micro-batches from `batches` until the window ends; the window (benchmark, probe)."""
        window = Window()
        while not self(next(batches), window, step).window_ended:
            pass
        return window

    def _forward_backward(self, batch: dict, window: Window, step: int) -> bool:
        """Returns whether this micro-batch (or the optimizer step it ended) was skipped as non-finite."""
        acc = self.acc
        images = batch["images"].float().div_(255)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with acc.accumulate(self.model):
            # The schedule is written before backward: DeepSpeed steps inside backward.
            window.lr = self.schedule.apply(self.optimizer, step)
            with self.phases("forward"), self._autocast(images.device):
                raw = self.model(images)
            with self.phases("loss"):
                losses = self.loss_fn(raw, batch["targets"])  # in fp32, whatever the forward's precision
                finite = torch.isfinite(losses["total"]).to(images.device, torch.float32)
                # Every rank must agree on skipping, or the collectives in backward would deadlock.
                all_finite = acc.reduce(finite, reduction="sum").item() == acc.num_processes
            if not all_finite:
                window.nonfinite = True
                return True
            with self.phases("backward"):
                acc.backward(losses["total"])
            nonfinite = False
            if acc.sync_gradients:
                window.stepped = True  # DeepSpeed stepped inside backward; otherwise step now
                if not self.deepspeed:
                    with self.phases("optimizer"):
                        norm = acc.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
                        if torch.isfinite(norm):  # never step into NaN weights
                            self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    if not torch.isfinite(norm):  # a finite loss can still overflow in backward
                        window.stepped = False  # the norm is the same on every rank: all skip
                        window.nonfinite = nonfinite = True
        window.add(losses, len(images), batch["skipped"])
        return nonfinite

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)
