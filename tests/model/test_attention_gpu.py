"""On a GPU: the `sdpa` path runs on fused kernels only, and needs far less memory than `explicit`."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from adyolo.model import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FUSED = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _peak_gib_of_step(model, images) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model(images)
    sum(o.float().square().mean() for o in outputs).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def test_sdpa_runs_without_the_math_fallback():
    # Without MATH in the allowed list, any shape the fused kernels reject raises "No viable backend".
    model = build_model({"size": "s", "attention": "sdpa"}).cuda()
    images = torch.randn(2, 3, 640, 640, device="cuda")
    with sdpa_kernel(FUSED):
        _peak_gib_of_step(model, images)


def test_explicit_needs_the_score_matrix_and_sdpa_does_not():
    images = torch.randn(4, 3, 640, 640, device="cuda")
    peaks = {}
    for implementation in ("sdpa", "explicit"):
        torch.manual_seed(0)
        model = build_model({"size": "s", "attention": implementation}).cuda()
        peaks[implementation] = _peak_gib_of_step(model, images)
        del model
        torch.cuda.empty_cache()
    # One bf16 score tensor at 80x80 tokens: 4 images x 4 heads x 6400^2 x 2 bytes = 1.2 GiB.
    scores_gib = 4 * 4 * 6400**2 * 2 / 2**30
    assert peaks["explicit"] - peaks["sdpa"] > scores_gib
