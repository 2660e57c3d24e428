"""Convolutional building blocks of YOLOv5-Face: Conv-BN-SiLU, C3, SPP and the stride-4 stem.

Shapes use B (batch), C (channels), H, W. All blocks keep H, W unless a stride is given.
"""

from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-3


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d with YOLOv5's eps (1e-3) instead of PyTorch's (1e-5); momentum stays PyTorch's 0.1.

    Why: with eps 1e-5 a channel whose running variance is small gets a huge eval-mode gain, and the
    network fires on every anchor of a few validation images (saturated backgrounds); 1e-3 bounds that
    gain. YOLOv5's momentum (0.03) is not taken: short runs would evaluate with running statistics still
    mostly at their initial values. The runs that showed both are in docs/measurements.md."""
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, optionally followed by SiLU; 'same' padding for odd kernels."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            batch_norm(c_out),
        )
        if act:
            self.append(nn.SiLU())


class Bottleneck(nn.Module):
    """1x1 then 3x3 Conv, with a residual when shapes allow and `shortcut` is set."""

    def __init__(self, channels: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBN(channels, channels, 1)
        self.cv2 = ConvBN(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C3(nn.Module):
    """CSP block: two 1x1 branches of width c_out/2, one through `repeats` Bottlenecks, fused by a 1x1."""

    def __init__(self, c_in: int, c_out: int, repeats: int = 1, shortcut: bool = True):
        super().__init__()
        hidden = c_out // 2
        self.cv1 = ConvBN(c_in, hidden, 1)
        self.cv2 = ConvBN(c_in, hidden, 1)
        self.cv3 = ConvBN(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, shortcut) for _ in range(repeats)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], dim=1))


class SPP(nn.Module):
    """Spatial pyramid pooling with YOLOv5-Face's small kernels (3, 5, 7): [B,C,H,W] -> [B,c_out,H,W]."""

    def __init__(self, c_in: int, c_out: int, kernels: tuple[int, ...] = (3, 5, 7)):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBN(c_in, hidden, 1)
        self.cv2 = ConvBN(hidden * (len(kernels) + 1), c_out, 1)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x, *(pool(x) for pool in self.pools)], dim=1))


class StemBlock(nn.Module):
    """YOLOv5-Face stem, stride 4: a 3x3 s2 conv, then a (1x1 -> 3x3 s2) path beside a 2x2 max-pool.

    [B,3,H,W] -> [B,c_out,H/4,W/4]
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.stem_1 = ConvBN(c_in, c_out, 3, 2)
        self.stem_2a = ConvBN(c_out, c_out // 2, 1)
        self.stem_2b = ConvBN(c_out // 2, c_out, 3, 2)
        self.stem_2p = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.stem_3 = ConvBN(2 * c_out, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_1(x)
        return self.stem_3(torch.cat([self.stem_2b(self.stem_2a(x)), self.stem_2p(x)], dim=1))
