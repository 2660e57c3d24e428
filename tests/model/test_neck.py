"""The neck's export form of adaptive pooling equals PyTorch's adaptive pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adyolo.model.neck import adaptive_avg_pool_matmul


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [
        ((20, 20), (10, 10)),  # integer ratio
        ((3, 3), (2, 2)),  # overlapping windows (96 px: High-GD's 3 -> 2)
        ((24, 16), (2, 1)),  # ceil(H/64) at 96 x 64 px
        ((7, 5), (3, 4)),  # non-integer in both directions, growing in one
    ],
)
def test_matmul_pooling_equals_adaptive_avg_pool(size_in, size_out):
    x = torch.randn(2, 3, *size_in, generator=torch.Generator().manual_seed(0))
    expected = F.adaptive_avg_pool2d(x, size_out)
    torch.testing.assert_close(adaptive_avg_pool_matmul(x, size_out), expected, rtol=1e-6, atol=1e-6)
