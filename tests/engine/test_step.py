"""The training step (`TrainStep`) in one process: a window steps the optimizer and the EMA; a non-finite
loss or gradient norm skips it and leaves the weights as they were."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from adyolo.config import RunConfig
from adyolo.data.batch import synthetic_batch
from adyolo.engine.setup import bare_step
from adyolo.engine.step import TrainStep
from adyolo.model import ModelConfig

IMG = 64


@pytest.fixture
def step() -> TrainStep:
    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(size="n", fusion="efficient", img_size=IMG))
    return bare_step(cfg.model, cfg.loss, cfg.optim, cfg.train, torch.device("cpu"))


def weights(step: TrainStep) -> list[torch.Tensor]:
    return [p.detach().clone() for p in step.model.parameters()]


def test_a_window_steps_the_optimizer_and_the_ema(step):
    before, ema_before = weights(step), step.ema.module.state_dict()["head.convs.0.bias"].clone()
    window = step.run_window(itertools.repeat(synthetic_batch(2, IMG)), step=0)
    assert window.stepped and not window.nonfinite and window.micro == 1 and window.images == 2
    losses = window.losses()
    assert all(math.isfinite(v) for v in losses.values()) and losses["box"] > 0 and losses["landmark"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(step)))
    assert step.ema.updates == 1 and not torch.equal(step.ema.module.state_dict()["head.convs.0.bias"], ema_before)
    assert all(p.grad is None for p in step.model.parameters())  # gradients dropped after the step
    assert window.lr == step.optimizer.param_groups[0]["lr"]  # the schedule was written before the step


def test_a_nonfinite_loss_skips_the_micro_batch(step):
    real = step.loss_fn

    class Poisoned(type(real)):
        def __call__(self, *args, **kwargs):
            losses = super().__call__(*args, **kwargs)
            return {**losses, "total": losses["total"] * float("nan")}

    step.loss_fn.__class__ = Poisoned
    before = weights(step)
    window = step.run_window(itertools.repeat(synthetic_batch(2, IMG)), step=0)
    assert window.nonfinite and not window.stepped and window.micro == 0
    assert all(torch.equal(a, b) for a, b in zip(before, weights(step)))
    assert step.ema.updates == 0


def test_a_nonfinite_gradient_norm_skips_the_step(step):
    first = next(step.model.parameters())
    first.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = weights(step)
    window = step([synthetic_batch(2, IMG)], step=0)
    assert window.nonfinite == 1 and not window.stepped and window.micro == 1  # the loss itself was finite
    assert all(torch.equal(a, b) for a, b in zip(before, weights(step)))
    assert step.ema.updates == 0 and all(p.grad is None for p in step.model.parameters())
