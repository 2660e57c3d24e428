"""The training step, written once: what the trainer trains, the benchmark times and the micro-batch
probe measures.

One optimizer step is a window of `accumulation` micro-batches on every rank. First, what normalises
the loss: each micro-batch's target assignment, and the assignment counts of the whole global batch
(summed over the micro-batches and the ranks). Then each micro-batch: write the schedule's learning rate
and momentum, forward, its part of the global batch's loss, the all-rank check that the loss is finite,
backward (accumulating). At the window's end: clip the gradient norm, step the optimizer (or skip the
step if the norm is not finite), update the EMA. Under DeepSpeed, clipping and the optimizer step happen
inside `backward`, as its JSON says. The step's gradient is that of the global batch's loss (YOLOv5's:
mean x images) in one piece, whatever the ranks, micro-batches and accumulation.

With an `Accelerator` the step runs on the prepared (DDP / DeepSpeed / bare) model, and mixed
precision is the wrapper's. Without one (`accelerator=None`) it runs a bare model in this process
alone, one micro-batch per window, in the autocast it is given: the micro-batch probe, the memory plan
and `launch/model_info.py` run it so.
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
from adyolo.loss.criterion import DetectionLoss, LossNorm

LOSS_TERMS = ("box", "obj", "cls", "landmark")


@dataclass
class Window:
    """One optimizer step's micro-batches: the loss terms, images, wall time and what happened."""

    start: float = field(default_factory=time.perf_counter)
    terms: torch.Tensor | None = None  # [4] (LOSS_TERMS) on the device: the step's parts of the mean terms
    micro: int = 0  # micro-batches whose loss was finite (and went through backward)
    images: int = 0  # this rank's
    skipped: set[int] = field(default_factory=set)  # indices of unreadable images met in this window's batches
    stepped: bool = False  # the optimizer changed the weights
    nonfinite: int = 0  # micro-batches (or the step) skipped for a non-finite value
    lr: float = 0.0  # the weights' learning rate of this step

    def add(self, losses: dict[str, torch.Tensor], images: int, skipped: list[int]) -> None:
        # Kept on the device: reading a value here would make every micro-batch wait for the device.
        terms = torch.stack([losses[k] for k in LOSS_TERMS])
        self.terms = terms if self.terms is None else self.terms + terms
        self.micro += 1
        self.images += images
        self.skipped.update(skipped)

    def losses(self) -> dict[str, float]:
        """The step's mean loss terms and their sum (reads the device: call where a value is shown)."""
        values = dict(zip(LOSS_TERMS, self.terms.tolist() if self.terms is not None else [0.0] * len(LOSS_TERMS)))
        values["total"] = sum(values.values())
        return values

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


class _ThisProcess:
    """The few things the step asks of an Accelerator, for a bare model in one process: gradients of
    one micro-batch, nothing to synchronise, plain `backward` and `clip_grad_norm_`."""

    num_processes = 1
    gradient_accumulation_steps = 1
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
    """Call it with the micro-batches of one optimizer step (each: images uint8 [B, 3, H, W], targets
    [M, 16] `TargetRow`; moved to the device here); returns the step's `Window`.

    `model`, `optimizer`: prepared by `accelerator` (or bare, without one). `global_batch`: the images of
    one optimizer step over every rank (None: this process's micro-batches are the whole batch).
    `grad_clip` 0 means no clipping (under DeepSpeed the JSON clips). `ema`, when given, is updated after
    every optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: DetectionLoss,
        schedule: Schedule,
        *,
        grad_clip: float,
        global_batch: int | None = None,
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
        self.global_batch = global_batch
        self.ema = ema
        self.channels_last = channels_last
        self.acc = accelerator if accelerator is not None else _ThisProcess()
        self.deepspeed = accelerator is not None and accelerator.distributed_type.name == "DEEPSPEED"
        if accelerator is not None and autocast_dtype is not None:
            raise ValueError("with an Accelerator, mixed precision is the Accelerator's (or DeepSpeed's) to apply")
        self.autocast_dtype = autocast_dtype
        self.phases = phases if phases is not None else PhaseTimes(enabled=False)
        # Found once: Accelerate's `unwrap_model` and `parameters()` walk the whole module tree (milliseconds
        # a step on a CPU), and neither the wrapper nor the parameters change.
        self.bare = self.acc.unwrap_model(model)
        self.params = list(model.parameters())
        self.device = accelerator.device if accelerator is not None else self.params[0].device

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank and optimizer step."""
        return self.acc.gradient_accumulation_steps

    def __call__(self, batches: list[dict], step: int) -> Window:
        """Train optimizer step `step` (0-based, for the schedule) on this rank's `accumulation` micro-batches."""
        if len(batches) != self.accumulation:
            raise ValueError(f"{len(batches)} micro-batches for a step of {self.accumulation}")
        window = Window()
        batches = [self._to_device(b) for b in batches]
        norm = self._norm(batches)
        for batch, levels in zip(batches, norm.levels):
            self._forward_backward(batch, levels, norm.loss, window, step)
        if window.stepped:
            if self.ema is not None:
                with self.phases("optimizer"):
                    self.ema.update(self.bare)
        elif not self.deepspeed:
            # The window's last micro-batch was skipped: drop the window's gradients. (DeepSpeed keeps
            # them and adds them to the next window's step.)
            self.optimizer.zero_grad(set_to_none=True)
        if self.acc.num_processes > 1 and window.terms is not None:
            # Every rank's parts of the global batch's mean terms, summed: the step's loss (a collective).
            window.terms = self.acc.reduce(window.terms, reduction="sum")
        return window

    def weight_bytes(self) -> int:
        """Bytes of the weights and buffers this step keeps alive between steps: the model's and the
        EMA's (the memory plan tells them apart from a process's other memory)."""
        modules = [self.bare, *([self.ema.module] if self.ema is not None else [])]
        return sum(t.nbytes for m in modules for t in (*m.parameters(), *m.buffers()))

    def run_window(self, batches: Iterator[dict], step: int) -> Window:
        """One optimizer step on the next `accumulation` micro-batches of `batches` (benchmark, probe)."""
        return self([next(batches) for _ in range(self.accumulation)], step)

    # ------------------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {
            **batch,
            "images": batch["images"].to(self.device, non_blocking=True),
            "targets": batch["targets"].to(self.device, non_blocking=True),
        }

    def _norm(self, batches: list[dict]) -> _StepNorm:
        """Each micro-batch's assignment, and what normalises every micro-batch's loss: the counts of the
        whole global batch (summed over this rank's micro-batches and, in a collective, over the ranks;
        no host read)."""
        with self.phases("loss"):
            levels = [self.loss_fn.assign(b["targets"], tuple(b["images"].shape[2:])) for b in batches]
            counts = sum(DetectionLoss.counts(lv) for lv in levels)
            if self.acc.num_processes > 1:
                counts = self.acc.reduce(counts, reduction="sum")
        images = self.global_batch if self.global_batch is not None else sum(len(b["images"]) for b in batches)
        return _StepNorm(levels, LossNorm(images, counts))

    def _forward_backward(self, batch: dict, levels: list, norm: LossNorm, window: Window, step: int) -> None:
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
                losses = self.loss_fn(raw, batch["targets"], levels, norm)  # in fp32, whatever the forward's
                finite = torch.isfinite(losses["total"]).to(images.device, torch.float32)
                # Every rank must agree on skipping, or the collectives in backward would deadlock: the
                # step's one host read per micro-batch.
                all_finite = acc.reduce(finite, reduction="sum").item() == acc.num_processes
            if not all_finite:
                window.nonfinite += 1
                return
            total = losses["total"]
            reduced = acc.num_processes * self.accumulation
            if reduced > 1:
                # DDP and DeepSpeed average the gradients over the ranks, Accelerate and DeepSpeed divide
                # the loss by the accumulation steps: the step's gradient is then the sum of the
                # micro-batches' parts, the global batch's loss in one piece.
                total = total * reduced
            with self.phases("backward"):
                acc.backward(total)
            if acc.sync_gradients:
                window.stepped = True  # DeepSpeed stepped inside backward; otherwise step now
                if not self.deepspeed:
                    with self.phases("optimizer"):
                        norm_value = acc.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
                        finite_norm = bool(torch.isfinite(norm_value))  # the step's one host read
                        if finite_norm:  # never step into NaN weights
                            self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    if not finite_norm:  # a finite loss can still overflow in backward
                        window.stepped = False  # the norm is the same on every rank: all skip
                        window.nonfinite += 1
        window.add(losses, len(images), batch["skipped"])

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


@dataclass(frozen=True)
class _StepNorm:
    levels: list  # per micro-batch: its `LevelTargets` per level
    loss: LossNorm
