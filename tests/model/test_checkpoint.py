"""Activation checkpointing: same numbers, BatchNorm counted once per step, less memory kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from adyolo.model import build_model
from adyolo.model.checkpoint import checkpointed_blocks
from adyolo.model.config import CHECKPOINTABLE_BLOCKS, CHECKPOINTABLE_BLOCKS_BY_NECK


def _saved_activation_bytes(model, images) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    return total


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize(
    "variant", [{"fusion": "full"}, {"fusion": "efficient"}, {"neck": "yolov5face"}], ids=lambda v: str(*v.values())
)
def test_checkpointing_changes_nothing_but_memory(variant):
    torch.manual_seed(0)
    plain = build_model({"size": "n", **variant})
    ckpt = build_model({"size": "n", **variant, "checkpoint": ["all"]})
    ckpt.load_state_dict(plain.state_dict())
    assert checkpointed_blocks(ckpt) == list(ckpt.cfg.checkpointable_blocks) and not checkpointed_blocks(plain)
    assert ckpt.cfg.checkpointable_blocks == CHECKPOINTABLE_BLOCKS_BY_NECK[ckpt.cfg.neck]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (plain, ckpt)]
    images = torch.randn(2, 3, 128, 128)
    for step in range(1, 3):
        losses, grads = [], []
        for model, opt in zip((plain, ckpt), optimizers):
            torch.manual_seed(step)  # same stochastic-depth draws in both
            opt.zero_grad()
            loss = sum(o.square().mean() for o in model(images))
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for bn_plain, bn_ckpt in zip(_batchnorms(plain), _batchnorms(ckpt)):
            assert bn_plain.num_batches_tracked.item() == step
            assert bn_ckpt.num_batches_tracked.item() == step
            torch.testing.assert_close(bn_ckpt.running_mean, bn_plain.running_mean)
            torch.testing.assert_close(bn_ckpt.running_var, bn_plain.running_var)


@pytest.mark.parametrize("neck", ["gd", "yolov5face"])
def test_every_checkpointable_block_is_recomputed(neck):
    torch.manual_seed(0)
    plain = build_model({"size": "n", "neck": neck})
    images = torch.randn(2, 3, 128, 128)
    baseline = _saved_activation_bytes(plain, images)
    names = CHECKPOINTABLE_BLOCKS_BY_NECK[neck]
    assert neck != "gd" or names == CHECKPOINTABLE_BLOCKS
    for name in names:
        model = copy.deepcopy(plain)
        model.get_submodule(name).activation_checkpointing = True
        assert _saved_activation_bytes(model, images) < baseline, f"{name} is not run through run_block"
    everything = build_model({"size": "n", "neck": neck, "checkpoint": ["all"]})
    assert _saved_activation_bytes(everything, images) < 0.25 * baseline


def test_no_recompute_in_eval():
    model = build_model({"size": "n", "checkpoint": ["all"]}).eval()
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = model(images)
    assert all(not o.requires_grad for o in out)
    assert all(bn.num_batches_tracked.item() == 0 for bn in _batchnorms(model))
