"""BatchNorm folding for inference: each ConvBN's Conv2d -> BatchNorm2d pair becomes one Conv2d with a bias.

In eval mode BatchNorm is a fixed per-channel affine map, y = (x - mean) / sqrt(var + eps) * gamma + beta,
so it can be multiplied into the convolution before it: one pass over the feature map instead of two.
The outputs equal the unfolded model's up to floating-point rounding (about 1e-6 relative in fp32).
The BatchNorms that do not follow a convolution (the fusion blocks' and attention's input norms) stay.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from adyolo.model.blocks import ConvBN


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold, in place, every ConvBN's BatchNorm into its convolution; returns how many were folded.

    The model must be in eval mode (folding uses the running statistics) and is for inference afterwards:
    it has no batch statistics left to train with, and its state dict no longer loads into an unfolded
    model. Folding a folded model folds nothing.
    """
    if model.training:
        raise ValueError("fold_batchnorm_: call model.eval() first; folding uses BatchNorm's running statistics")
    folded = 0
    for module in model.modules():
        if isinstance(module, ConvBN) and isinstance(module[1], nn.BatchNorm2d):
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = nn.Identity()
            folded += 1
    return folded
