"""Inference speed with and without BatchNorm folding: the detector's eval-mode forward (what
`launch/detect.py` runs before NMS), each model of the grid, both forms timed in turn in one process."""

from __future__ import annotations

import copy
import statistics
import time

import torch

from adyolo.config import load_run_config
from adyolo.model import build_model, fold_batchnorm_


def bench_inference(
    models: list[tuple[str, list[str]]], config: str | None, img: int, batch: int, steps: int, warmup: int
) -> list[dict]:
    """For each (name, overrides): images/s of the plain and the folded model, and how many BatchNorms
    were folded. The two are timed alternately, step by step, so that a machine whose speed drifts
    (shared VMs do) affects both alike; each figure is the median step. On a GPU steps are synchronised."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.rand(batch, 3, img, img, device=device)
    rows = []
    for name, overrides in models:
        cfg = load_run_config(config, overrides)
        torch.manual_seed(0)
        plain = build_model(cfg.model).to(device).eval()
        folded = copy.deepcopy(plain)
        count = fold_batchnorm_(folded)
        seconds: dict[str, list[float]] = {"plain": [], "folded": []}
        with torch.inference_mode():
            for step in range(warmup + steps):
                for form, model in (("plain", plain), ("folded", folded)):
                    start = time.perf_counter()
                    model(images)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if step >= warmup:
                        seconds[form].append(time.perf_counter() - start)
        plain_ips, folded_ips = (batch / statistics.median(seconds[f]) for f in ("plain", "folded"))
        rows.append(
            {
                "model": name,
                "batch": batch,
                "folded": count,
                "images_per_s": plain_ips,
                "folded_images_per_s": folded_ips,
            }
        )
        del plain, folded
    return rows
