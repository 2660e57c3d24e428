"""Bodies of GPU tests that take a device, so the CPU suite runs them too (`test_jobs.py`)."""

from __future__ import annotations

import itertools

import torch

from adyolo.config import RunConfig
from adyolo.data.batch import synthetic_batch
from adyolo.engine.setup import bare_step
from adyolo.model import ModelConfig


def check_bf16_step(device: torch.device) -> None:
    """A training step under bf16 autocast on `device`: the forward's maps are bf16, the loss and the
    gradients fp32 (the weights stay fp32), the loss finite, and the optimizer changes the weights."""
    cfg = RunConfig(model=ModelConfig(size="n", fusion="full", img_size=64))
    step = bare_step(cfg.model, cfg.loss, cfg.optim, cfg.train, device, torch.bfloat16)
    maps, losses = [], []
    step.model.register_forward_hook(lambda module, args, out: maps.extend(out))
    loss_fn = step.loss_fn

    class Recorded(type(loss_fn)):  # the step's own loss, its results kept
        def __call__(self, *args):
            losses.append(super().__call__(*args))
            return losses[-1]

    step.loss_fn.__class__ = Recorded
    grads = {}
    for name, p in step.model.named_parameters():
        p.register_hook(lambda grad, name=name: grads.__setitem__(name, grad.dtype))
    before = [p.detach().clone() for p in step.model.parameters()]
    window = step.run_window(itertools.repeat(synthetic_batch(2, cfg.model.img_size, device)), step=0)
    assert window.stepped and not window.nonfinite
    assert maps and all(m.dtype == torch.bfloat16 and m.device.type == device.type for m in maps)
    assert losses and losses[0]["total"].dtype == torch.float32 and torch.isfinite(losses[0]["total"])
    assert grads and set(grads.values()) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in step.model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, step.model.parameters()))
