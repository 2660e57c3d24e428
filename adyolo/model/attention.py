"""Exact multi-head attention over feature-map tokens, in two interchangeable implementations.

`sdpa` calls `torch.nn.functional.scaled_dot_product_attention`, which dispatches to fused kernels
(cuDNN / flash / memory-efficient on GPU, flash on CPU) that never materialise the [B, heads, N, N]
score tensor. `explicit` computes softmax(Q K^T * scale) V with a matmul; it is the reference
implementation and the one that reproduces the out-of-memory failure at 80x80 tokens and batch 40
(24.4 GiB of fp32 scores per block). Both compute the same function with the same parameters.

The fused kernels need q, k and v to share one head dimension; with different ones SDPA silently
falls back to its math path, which materialises the scores. The blocks here keep them equal.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from adyolo.model.blocks import ConvBN, batch_norm

AttentionImpl = Literal["sdpa", "explicit"]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, implementation: AttentionImpl) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape [B, heads, N, d] -> [B, heads, N, d]."""
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # [B, heads, N, N]
    return torch.matmul(scores.softmax(dim=-1), v)


def to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, heads*d, H, W] -> [B, heads, H*W, d]."""
    b, c, h, w = x.shape
    return x.reshape(b, num_heads, c // num_heads, h * w).transpose(-2, -1)


def from_heads(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, heads, H*W, d] -> [B, heads*d, H, W]."""
    b, num_heads, _, d = x.shape
    return x.transpose(-2, -1).reshape(b, num_heads * d, height, width)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = F.dropout(x.new_ones(x.shape[0], *([1] * (x.dim() - 1))), rate, training=True)
    return x * keep


class MultiHeadSelfAttention2d(nn.Module):
    """Pre-norm multi-head self-attention over all H*W positions: [B,C,H,W] -> [B,C,H,W].

    BN -> 1x1 qkv conv -> attention (heads of C/heads channels) -> 1x1 conv + BN projection, plus the
    residual. The full-attention block of the low plug point.
    """

    def __init__(self, channels: int, num_heads: int, implementation: AttentionImpl):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.implementation = implementation
        self.norm = batch_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = ConvBN(channels, channels, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        q, k, v = (to_heads(t, self.num_heads) for t in self.qkv(self.norm(x)).chunk(3, dim=1))
        out = attend(q.contiguous(), k.contiguous(), v.contiguous(), self.implementation)
        return x + self.proj(from_heads(out, h, w))


class GoldAttention(nn.Module):
    """Gold-YOLO's top-block attention on a small map: [B,C,H,W] -> [B,C,H,W] (residual branch only).

    q, k, v: 1x1 conv + BN to heads*key_dim; attention; ReLU6; 1x1 conv + BN projection whose BN
    weight starts at 0, so the block starts as the identity. Gold-YOLO gives v twice the key width
    and skips the 1/sqrt(d) scale; here all three share `key_dim` so the fused SDPA kernels stay
    eligible, and the standard scale is applied.
    """

    def __init__(self, channels: int, num_heads: int, key_dim: int, implementation: AttentionImpl):
        super().__init__()
        inner = num_heads * key_dim
        self.num_heads = num_heads
        self.implementation = implementation
        self.to_q = ConvBN(channels, inner, 1, act=False)
        self.to_k = ConvBN(channels, inner, 1, act=False)
        self.to_v = ConvBN(channels, inner, 1, act=False)
        self.proj = nn.Sequential(nn.ReLU6(), ConvBN(inner, channels, 1, act=False))
        nn.init.zeros_(self.proj[1][1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        q, k, v = (to_heads(f(x), self.num_heads) for f in (self.to_q, self.to_k, self.to_v))
        out = attend(q.contiguous(), k.contiguous(), v.contiguous(), self.implementation)
        return self.proj(from_heads(out, h, w))
