"""BatchNorm folding for inference: the folded detector gives the same outputs with one layer fewer per
Conv-BN pair, for every network the model builds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adyolo.model import build_model, fold_batchnorm_
from adyolo.model.blocks import ConvBN

from ..conftest import assert_tensors_agree

NETWORKS = [
    {"fusion": "efficient"},
    {"fusion": "full", "attention": "sdpa"},
    {"fusion": "full", "attention": "explicit"},
    {"neck": "yolov5face"},
]


def trained_like(settings: dict) -> nn.Module:
    """A size-n detector whose BatchNorms hold non-trivial running statistics and affine parameters,
    as trained weights do (fresh ones are the identity map, which folding would trivially preserve)."""
    torch.manual_seed(0)
    model = build_model({"size": "n", "img_size": 96, **settings})
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("settings", NETWORKS, ids=lambda s: "/".join(s.values()))
def test_folded_detector_gives_the_same_outputs(settings):
    model = trained_like(settings)
    images = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        expected = model(images)
        pairs = sum(isinstance(m, ConvBN) for m in model.modules())
        batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert fold_batchnorm_(model) == pairs > 0
        folded = model(images)
    # Only the BatchNorms that follow no convolution remain; every ConvBN is now conv (+ activation).
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batchnorms - pairs
    pairs_now = [m for m in model.modules() if isinstance(m, ConvBN)]
    assert all(m[0].bias is not None and isinstance(m[1], nn.Identity) for m in pairs_now)
    assert_tensors_agree(folded, expected, tolerance=1e-5)
    assert fold_batchnorm_(model) == 0  # folding twice folds nothing more


def test_folding_a_model_in_training_mode_is_refused():
    model = build_model({"size": "n", "img_size": 96}).train()
    with pytest.raises(ValueError, match="model.eval"):
        fold_batchnorm_(model)
    assert all(isinstance(m[1], nn.BatchNorm2d) for m in model.modules() if isinstance(m, ConvBN))  # untouched
