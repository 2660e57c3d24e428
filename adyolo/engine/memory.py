"""Per-rank memory: what each rank's device holds, gathered so the main process can log it.

A snapshot is a fixed-length tensor (so every rank's can be gathered in one collective); what is
logged from it depends on the device, because on a CPU "allocated" and "reserved" are both the process
RSS and would be two charts of one number:

- GPU: `peak_allocated_gib` and `peak_reserved_gib` (PyTorch's caching allocator, peaks since the last
  log) and `nvml_process_gib` (the device memory NVML counts for this process: allocator, CUDA context,
  NCCL, kernels' workspaces), when `nvidia-ml-py` can see the process.
- CPU: `peak_rss_gib` (the process's peak resident set) and `rss_gib` (now).

MLflow names are `memory/<kind>/rank<r>`: the UI groups charts by the prefix before the last `/`, so each
kind gets one section holding every rank side by side. With several ranks `memory/<kind>/max` and
`memory/<kind>/spread` (max - min over ranks) say at a glance how close the fullest rank is to the limit
and how uneven the ranks are.
"""

from __future__ import annotations

import math
import os
import resource

import psutil
import torch

GIB = 2**30
# Columns of a snapshot (the benchmark reads them by these names).
FIELDS = ("peak_allocated_gib", "peak_reserved_gib", "allocated_gib", "reserved_gib", "nvml_process_gib")
# What is logged per device type: metric kind -> snapshot column.
LOGGED = {
    "cuda": {"peak_allocated_gib": 0, "peak_reserved_gib": 1, "nvml_process_gib": 4},
    "cpu": {"peak_rss_gib": 0, "rss_gib": 2},
}


def snapshot(device: torch.device) -> torch.Tensor:
    """[5] float64 GiB (`FIELDS`): peak/current allocated and reserved device memory since the last reset,
    and NVML's count for this process (NaN where NVML cannot tell). On CPU: peak and current process RSS
    (allocated and reserved read the same), NaN for NVML."""
    if device.type == "cuda":
        values = [
            torch.cuda.max_memory_allocated(device),
            torch.cuda.max_memory_reserved(device),
            torch.cuda.memory_allocated(device),
            torch.cuda.memory_reserved(device),
            _nvml_process_bytes(device),
        ]
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        current = psutil.Process().memory_info().rss
        values = [peak, peak, current, current, math.nan]
    return torch.tensor(values, dtype=torch.float64) / GIB


def _nvml_process_bytes(device: torch.device) -> float:
    """Device memory NVML attributes to this process, or NaN (no nvidia-ml-py, no NVML, or the process
    not visible to it, as in some containers whose PIDs NVML does not share)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid() and process.usedGpuMemory is not None:
                return float(process.usedGpuMemory)
    except Exception:  # NVML is a nice-to-have: any failure means "not known", never a failed step
        pass
    return math.nan


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def per_rank_metrics(gathered: torch.Tensor, device_type: str) -> dict[str, float]:
    """gathered [world, 5] snapshots -> {"memory/<kind>/rank<r>": GiB, ...} for the kinds that mean
    something on `device_type` ("cuda" or "cpu"), plus `memory/<kind>/max` and `/spread` over ranks when
    there are several. Values NVML could not read are left out."""
    rows = gathered.view(-1, len(FIELDS))
    metrics = {}
    for kind, column in LOGGED["cuda" if device_type == "cuda" else "cpu"].items():
        values = [float(v) for v in rows[:, column].tolist()]
        known = [v for v in values if math.isfinite(v)]
        metrics.update({f"memory/{kind}/rank{rank}": v for rank, v in enumerate(values) if math.isfinite(v)})
        if len(values) > 1 and known:
            metrics[f"memory/{kind}/max"] = max(known)
            metrics[f"memory/{kind}/spread"] = max(known) - min(known)
    return metrics


def fullest_rank_gib(gathered: torch.Tensor, device_type: str) -> float:
    """gathered [world, 5] snapshots -> the largest `headline_kind` value over the ranks (GiB)."""
    column = LOGGED["cuda" if device_type == "cuda" else "cpu"][headline_kind(device_type)]
    return float(gathered.view(-1, len(FIELDS))[:, column].max())


def headline_kind(device_type: str) -> str:
    """The memory kind a summary quotes: the peak the plan predicts and a budget is held against."""
    return "peak_allocated_gib" if device_type == "cuda" else "peak_rss_gib"
