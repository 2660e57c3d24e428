"""Gather-and-Distribute (GD) neck with four outputs, after Gold-YOLO, extended to a P2 level.

Low-GD gathers C2..C5 at stride 8 (or 16), fuses them at plug point [A] and injects the result
top-down into P4 -> P3 -> P2. High-GD gathers P2, P3, P4 and C5 at stride 64, fuses them at plug
point [B] and injects bottom-up into N3 -> N4 -> N5. Outputs P2/4, N3/8, N4/16, N5/32 go to the head.

Channel names for size s at 640 px (B = batch):
    C2..C5  64x160^2, 128x80^2, 256x40^2, 512x20^2   (backbone)
    low     128x80^2   (low_gather -> low_fusion),  split into g4 256, g3 128, g2 64
    high    256x10^2   (high_gather -> high_fusion), split into h3 128, h4 256, h5 512
    outputs 64x160^2, 128x80^2, 256x40^2, 512x20^2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from adyolo.model.blocks import C3, ConvBN
from adyolo.model.checkpoint import run_block
from adyolo.model.config import ModelConfig, scale_depth, scale_width
from adyolo.model.fusion import build_high_fusion, build_low_fusion

Size = tuple[int, int]


def pool_to(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Adaptive average pooling of [B,C,H,W] to [B,C,*size] (identity when already that size).

    Eager mode (training, evaluation) always runs `F.adaptive_avg_pool2d`. Under `torch.export` (ONNX
    export) a pooling whose ratio is not provably an integer for every allowed input size -- High-GD's
    ceil(H/64) target, or 3 -> 2 at 96 px -- runs as `adaptive_avg_pool_matmul` instead: the exporter
    lowers a non-integer adaptive pooling to a gather whose indices are fixed at the example size, which
    breaks the graph at any other size (and at 96 px even at the example size).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if torch.compiler.is_exporting() and not all(statically_known_true(n % m == 0) for n, m in zip(x.shape[-2:], size)):
        return adaptive_avg_pool_matmul(x, size)
    return F.adaptive_avg_pool2d(x, size)


def adaptive_avg_pool_matmul(x: torch.Tensor, size: Size) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, size)` as two matmuls with averaging matrices built from the shapes.

    Output cell i along a side of n inputs averages inputs [floor(i*n/m), ceil((i+1)*n/m)), PyTorch's
    adaptive windows. Only Range, comparisons and MatMul, so the sizes stay symbolic in an export.
    Equal to the pooling up to float rounding (summation order), about 1e-7 relative.
    """
    rows = _averaging_matrix(x.shape[-2], size[0], x)  # [m_h, H]
    cols = _averaging_matrix(x.shape[-1], size[1], x)  # [m_w, W]
    return torch.matmul(rows, torch.matmul(x, cols.transpose(0, 1)))


def _averaging_matrix(n, m, like: torch.Tensor) -> torch.Tensor:
    """[m, n]: row i is 1/len over PyTorch's i-th adaptive window of n inputs into m outputs, else 0."""
    i = torch.arange(m, device=like.device)
    start = torch.div(i * n, m, rounding_mode="floor")
    end = torch.div((i + 1) * n + m - 1, m, rounding_mode="floor")
    j = torch.arange(n, device=like.device)
    inside = (j.unsqueeze(0) >= start.unsqueeze(1)) & (j.unsqueeze(0) < end.unsqueeze(1))
    return inside.to(like.dtype) / (end - start).to(like.dtype).unsqueeze(1)


def upsample_to(x: torch.Tensor, size: Size) -> torch.Tensor:
    return (
        x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    )


def resize_to(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Average-pool a larger map down, bilinearly resize a smaller one up."""
    return pool_to(x, size) if x.shape[-2] >= size[0] else upsample_to(x, size)


class Inject(nn.Module):
    """Inject global information into a local map: local_embed(x) * hardsigmoid(act(g)) + embed(g).

    A larger global map is average-pooled to the local size before its 1x1 convs (pooling commutes
    with them and is cheaper); a smaller one is resized after them. Gold-YOLO skips the sigmoid on
    the pooling path; here both paths apply it.
    """

    def __init__(self, c_local: int, c_global: int, c_out: int):
        super().__init__()
        self.local_embed = ConvBN(c_local, c_out, 1, act=False)
        self.global_embed = ConvBN(c_global, c_out, 1, act=False)
        self.global_act = ConvBN(c_global, c_out, 1, act=False)

    def forward(self, local: torch.Tensor, global_info: torch.Tensor) -> torch.Tensor:
        size = local.shape[-2:]
        global_info = pool_to(global_info, size) if global_info.shape[-2] > size[0] else global_info
        gate = upsample_to(F.hardsigmoid(self.global_act(global_info)), size)
        embed = upsample_to(self.global_embed(global_info), size)
        return self.local_embed(local) * gate + embed


class Distribute(nn.Module):
    """1x1 Conv, then split along channels: [B,C,H,W] -> tuple of [B,c_i,H,W]."""

    def __init__(self, c_in: int, splits: tuple[int, ...]):
        super().__init__()
        self.splits = splits
        self.conv = ConvBN(c_in, sum(splits), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(self.conv(x), list(self.splits), dim=1)


class LowGather(nn.Module):
    """Low-FAM + 1x1 Conv: bring C2..C5 to one size (pool larger, resize smaller), concat, project."""

    def __init__(self, c_in: int, c_out: int, align_index: int):
        super().__init__()
        self.align_index = align_index  # 1: align to C3 (stride 8), 2: align to C4 (stride 16)
        self.conv = ConvBN(c_in, c_out, 1)

    def forward(self, c2: torch.Tensor, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> torch.Tensor:
        feats = (c2, c3, c4, c5)
        size = feats[self.align_index].shape[-2:]
        return self.conv(torch.cat([resize_to(f, size) for f in feats], dim=1))


class HighGather(nn.Module):
    """High-FAM + 1x1 Conv: average-pool P2, P3, P4, C5 to input/`stride` (rounded up), concat, project."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = ConvBN(c_in, c_out, 1)

    def forward(self, p2: torch.Tensor, p3: torch.Tensor, p4: torch.Tensor, c5: torch.Tensor) -> torch.Tensor:
        # P2 has stride 4, so the input is 4 * its size. Ceil division as (n + d - 1) // d, the same
        # integer as -(-n // d) but without a negative operand: exported graphs may compute // by
        # truncation, which rounds a negative quotient the other way.
        size = tuple((4 * s + self.stride - 1) // self.stride for s in p2.shape[-2:])
        return self.conv(torch.cat([pool_to(f, size) for f in (p2, p3, p4, c5)], dim=1))


class TopDownLevel(nn.Module):
    """Low-side lateral fusion + Inject + C3 for P4, P3 (LAF3) or P2 (LAF2, no finer level).

    inputs: finer [B,c_finer,2H,2W] or None, level [B,c_level,H,W], coarser_half [B,c_half,H/2,W/2],
    global g [B,c_out,h,w] -> [B,c_out,H,W]
    """

    def __init__(self, c_finer: int, c_level: int, c_half: int, c_out: int, repeats: int):
        super().__init__()
        self.lateral = ConvBN(c_level, c_level, 1)
        self.fuse = ConvBN(c_finer + c_level + c_half, c_out, 1)
        self.inject = Inject(c_out, c_out, c_out)
        self.refine = C3(c_out, c_out, repeats, shortcut=False)

    def forward(
        self, finer: torch.Tensor | None, level: torch.Tensor, coarser_half: torch.Tensor, global_info: torch.Tensor
    ) -> torch.Tensor:
        size = level.shape[-2:]
        parts = [self.lateral(level), upsample_to(coarser_half, size)]
        if finer is not None:
            parts.insert(0, pool_to(finer, size))
        return self.refine(self.inject(self.fuse(torch.cat(parts, dim=1)), global_info))


class BottomUpLevel(nn.Module):
    """High-side fusion (pool the finer output, concat the same-level half) + Inject + C3.

    inputs: finer [B,c_finer,2H,2W], half [B,c_half,H,W], global h [B,c_out,h,w] -> [B,c_out,H,W]
    """

    def __init__(self, c_finer: int, c_half: int, c_out: int, repeats: int):
        super().__init__()
        self.inject = Inject(c_finer + c_half, c_out, c_out)
        self.refine = C3(c_out, c_out, repeats, shortcut=False)

    def forward(self, finer: torch.Tensor, half: torch.Tensor, global_info: torch.Tensor) -> torch.Tensor:
        local = torch.cat([pool_to(finer, half.shape[-2:]), half], dim=1)
        return self.refine(self.inject(local, global_info))


class GDNeck(nn.Module):
    """(C2, C3, C4, C5) -> (P2/4, N3/8, N4/16, N5/32) with channels `out_channels` = backbone channels."""

    def __init__(self, backbone_channels: tuple[int, int, int, int], cfg: ModelConfig):
        super().__init__()
        c2, c3, c4, c5 = backbone_channels
        self.out_channels = backbone_channels
        repeats = scale_depth(3, cfg.depth_multiple)
        low_embed = cfg.low_channels
        high_embed = scale_width(512, cfg.width_multiple)

        # Low-GD: gather at stride 8 (or 16), fuse [A], distribute top-down.
        self.low_gather = LowGather(c2 + c3 + c4 + c5, low_embed, align_index=1 if cfg.low_stride == 8 else 2)
        self.low_fusion = build_low_fusion(
            cfg.fusion, low_embed, cfg.low_fusion_blocks, cfg.attention_heads, cfg.attention
        )
        self.low_distribute = Distribute(low_embed, (c4, c3, c2))
        self.reduce_c5 = ConvBN(c5, c5 // 2, 1)
        self.inject_p4 = TopDownLevel(c3, c4, c5 // 2, c4, repeats)
        self.reduce_p4 = ConvBN(c4, c4 // 2, 1)
        self.inject_p3 = TopDownLevel(c2, c3, c4 // 2, c3, repeats)
        self.reduce_p3 = ConvBN(c3, c3 // 2, 1)
        self.inject_p2 = TopDownLevel(0, c2, c3 // 2, c2, repeats)

        # High-GD: gather at stride 64, fuse [B], distribute bottom-up.
        self.high_gather = HighGather(c2 + c3 + c4 + c5, high_embed, cfg.high_stride)
        self.high_fusion = build_high_fusion(
            cfg.fusion, high_embed, cfg.high_fusion_blocks, cfg.attention, cfg.drop_path
        )
        self.high_distribute = Distribute(high_embed, (c3, c4, c5))
        self.inject_n3 = BottomUpLevel(c2, c3 // 2, c3, repeats)
        self.inject_n4 = BottomUpLevel(c3, c4 // 2, c4, repeats)
        self.inject_n5 = BottomUpLevel(c4, c5 // 2, c5, repeats)

    def forward(
        self, c2: torch.Tensor, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        low = run_block(self.low_gather, c2, c3, c4, c5)
        low = run_block(self.low_fusion, low)
        g4, g3, g2 = run_block(self.low_distribute, low)
        c5_half = self.reduce_c5(c5)
        p4 = run_block(self.inject_p4, c3, c4, c5_half, g4)
        p4_half = self.reduce_p4(p4)
        p3 = run_block(self.inject_p3, c2, c3, p4_half, g3)
        p3_half = self.reduce_p3(p3)
        p2 = run_block(self.inject_p2, None, c2, p3_half, g2)

        high = run_block(self.high_gather, p2, p3, p4, c5)
        high = run_block(self.high_fusion, high)
        h3, h4, h5 = run_block(self.high_distribute, high)
        n3 = run_block(self.inject_n3, p2, p3_half, h3)
        n4 = run_block(self.inject_n4, n3, p4_half, h4)
        n5 = run_block(self.inject_n5, n4, c5_half, h5)
        return p2, n3, n4, n5
