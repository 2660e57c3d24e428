"""The two fusion plug points of the GD neck, each in a `full` and an `efficient` variant.

[A] low plug point, on the Low-GD map (B x 128 x 80 x 80 for size s at 640 px):
    full       exact multi-head self-attention over all H*W tokens, then an FFN
    efficient  channel attention (GAP + MLP) and spatial attention (mean/max + 7x7 conv), then a 3x3 conv
[B] high plug point, on the High-GD map (B x 256 x 10 x 10):
    full       Gold-YOLO's transformer block (attention + conv MLP)
    efficient  depthwise 7x7 + channel gate + pointwise MLP (a depthwise-separable "transformer")

Every block maps [B,C,H,W] -> [B,C,H,W].
"""

from __future__ import annotations

import torch
from torch import nn

from adyolo.model.attention import AttentionImpl, GoldAttention, MultiHeadSelfAttention2d, drop_path
from adyolo.model.blocks import ConvBN, batch_norm


class SelfAttentionFusion(nn.Module):
    """[A] full: self-attention over every position plus a 1x1 FFN, each with a residual."""

    def __init__(self, channels: int, num_heads: int, implementation: AttentionImpl):
        super().__init__()
        self.attention = MultiHeadSelfAttention2d(channels, num_heads, implementation)
        self.ffn = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 1),
            nn.SiLU(),
            ConvBN(2 * channels, channels, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return x + self.ffn(x)


class ChannelSpatialFusion(nn.Module):
    """[A] efficient: x * CA(x) + x * SA(x) + x, then Conv 3x3. Memory O(B*C*H*W).

    CA has no BatchNorm so that batch size 1 trains and eval is unaffected by batch statistics.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // reduction, 1),
            nn.SiLU(),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )
        self.spatial_conv = ConvBN(2, 1, 7, act=False)
        self.out = ConvBN(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        spatial = torch.sigmoid(self.spatial_conv(pooled))
        return self.out(x * self.channel_gate(x) + x * spatial + x)


class GoldTransformerFusion(nn.Module):
    """[B] full: x + Attn(x), then x + MLP(x) (1x1+BN, DW 3x3, ReLU6, 1x1+BN), with stochastic depth."""

    def __init__(
        self, channels: int, implementation: AttentionImpl, drop_path_rate: float, num_heads: int = 4, key_dim: int = 16
    ):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.attention = GoldAttention(channels, num_heads, key_dim, implementation)
        self.mlp = nn.Sequential(
            ConvBN(channels, channels, 1, act=False),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            nn.ReLU6(),
            ConvBN(channels, channels, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attention(x), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(x), self.drop_path_rate, self.training)


class DepthwiseGatedFusion(nn.Module):
    """[B] efficient: BN -> DW 7x7 -> SiLU -> channel gate -> PW 1x1 (4x) + BN + SiLU -> PW 1x1 + BN,
    added to the input, then a final BN."""

    def __init__(self, channels: int, drop_path_rate: float, expansion: int = 4, reduction: int = 4):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.norm = batch_norm(channels)
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.act = nn.SiLU()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // reduction, 1),
            nn.SiLU(),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )
        self.pointwise = nn.Sequential(
            ConvBN(channels, expansion * channels, 1),
            ConvBN(expansion * channels, channels, 1, act=False),
        )
        self.out_norm = batch_norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.depthwise(self.norm(x)))
        y = self.pointwise(y * self.gate(y))
        return self.out_norm(x + drop_path(y, self.drop_path_rate, self.training))


def build_low_fusion(
    fusion: str, channels: int, num_blocks: int, num_heads: int, attention: AttentionImpl
) -> nn.Sequential:
    if fusion == "full":
        return nn.Sequential(*(SelfAttentionFusion(channels, num_heads, attention) for _ in range(num_blocks)))
    return nn.Sequential(*(ChannelSpatialFusion(channels) for _ in range(num_blocks)))


def build_high_fusion(
    fusion: str, channels: int, num_blocks: int, attention: AttentionImpl, drop_path_rate: float
) -> nn.Sequential:
    # Stochastic depth rises linearly from 0 at the first block to `drop_path_rate` at the last.
    rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
    if fusion == "full":
        return nn.Sequential(*(GoldTransformerFusion(channels, attention, r) for r in rates))
    return nn.Sequential(*(DepthwiseGatedFusion(channels, r) for r in rates))
