"""`sdpa` and `explicit` attention: the same function, but only one materialises the N x N scores."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adyolo.model import build_model
from adyolo.model.attention import GoldAttention, MultiHeadSelfAttention2d

from ..conftest import assert_tensors_agree


def _perturb_identically(a, b):
    """Random weights on top of the (random) init, so zero-initialised projections take part too."""
    with torch.no_grad():
        for p_a, p_b in zip(a.parameters(), b.parameters()):
            p_a.add_(torch.randn_like(p_a) * 0.05)
            p_b.copy_(p_a)


def _outputs_and_grads(module, *inputs):
    inputs = [x.clone().requires_grad_() for x in inputs]
    out = module(*inputs)
    outputs = out if isinstance(out, (list, tuple)) else [out]
    # A random projection of the outputs, so every output element gets a different gradient.
    torch.manual_seed(1)
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs)
    loss.backward()
    grads = [x.grad for x in inputs] + [p.grad for p in module.parameters()]
    return [o.detach() for o in outputs], grads


@pytest.mark.parametrize(
    "make",
    [
        lambda impl: MultiHeadSelfAttention2d(64, 4, impl),
        lambda impl: GoldAttention(64, 4, 16, impl),
    ],
    ids=["low-point MHSA", "high-point Gold attention"],
)
def test_attention_blocks_agree(make):
    torch.manual_seed(0)
    sdpa = make("sdpa")
    explicit = make("explicit")
    explicit.load_state_dict(sdpa.state_dict())
    _perturb_identically(sdpa, explicit)
    x = torch.randn(2, 64, 12, 10)
    out_a, grads_a = _outputs_and_grads(sdpa, x)
    out_b, grads_b = _outputs_and_grads(explicit, x)
    assert_tensors_agree(out_a, out_b, 1e-5)
    assert_tensors_agree(grads_a, grads_b, 1e-5)


def test_whole_detector_agrees_between_implementations():
    torch.manual_seed(0)
    sdpa = build_model({"size": "n", "attention": "sdpa", "drop_path": 0.0, "high_stride": 32})
    explicit = build_model({"size": "n", "attention": "explicit", "drop_path": 0.0, "high_stride": 32})
    explicit.load_state_dict(sdpa.state_dict())
    _perturb_identically(sdpa, explicit)
    images = torch.randn(2, 3, 128, 96)
    out_a, grads_a = _outputs_and_grads(sdpa, images)
    out_b, grads_b = _outputs_and_grads(explicit, images)
    assert len(grads_a) == len(grads_b) > 100
    assert_tensors_agree(out_a, out_b, 1e-5)
    assert_tensors_agree(grads_a, grads_b, 1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("implementation", ["sdpa", "explicit"])
def test_only_explicit_materialises_the_score_matrix(implementation):
    # 320 px with the low point at stride 8: N = 40 * 40 = 1600 tokens, 4 heads.
    batch, heads, tokens = 1, 4, 1600
    model = build_model({"size": "n", "attention": implementation, "attention_heads": heads})
    images = torch.randn(batch, 3, 320, 320)
    with LargestTensor() as largest:
        outputs = model(images)
        sum(o.sum() for o in outputs).backward()
    scores = batch * heads * tokens * tokens
    if implementation == "sdpa":
        assert largest.numel < scores / 4, largest.op
    else:
        assert largest.numel >= scores, largest.op
