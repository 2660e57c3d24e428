"""Per-rank memory: what each rank's device holds, gathered so the main process can log it."""

from __future__ import annotations

import resource

import psutil
import torch

GIB = 2**30
# Columns of a snapshot, also the metric names under memory/rank{r}/.
FIELDS = ("peak_allocated_gib", "peak_reserved_gib", "allocated_gib", "reserved_gib")


def snapshot(device: torch.device) -> torch.Tensor:
    """[4] float64 GiB: peak/current allocated and reserved device memory since the last reset.
    On CPU: peak and current process RSS (allocated and reserved read the same)."""
    if device.type == "cuda":
        values = [
            torch.cuda.max_memory_allocated(device),
            torch.cuda.max_memory_reserved(device),
            torch.cuda.memory_allocated(device),
            torch.cuda.memory_reserved(device),
        ]
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        current = psutil.Process().memory_info().rss
        values = [peak, peak, current, current]
    return torch.tensor(values, dtype=torch.float64) / GIB


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def per_rank_metrics(gathered: torch.Tensor) -> dict[str, float]:
    """gathered [world, 4] -> {"memory/rank0/peak_allocated_gib": ..., "memory/max/...": ...}."""
    metrics = {}
    for rank, row in enumerate(gathered.view(-1, len(FIELDS)).tolist()):
        metrics.update({f"memory/rank{rank}/{name}": float(v) for name, v in zip(FIELDS, row)})
    for i, name in enumerate(FIELDS):
        metrics[f"memory/max/{name}"] = float(gathered.view(-1, len(FIELDS))[:, i].max())
    return metrics
