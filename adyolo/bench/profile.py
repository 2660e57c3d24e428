"""`launch/bench.py --profile`: where a row's training step spends its time, operator by operator.

After a row's timed steps (so the profiler never slows what is timed), its ranks run `PROFILED_STEPS`
more optimizer steps under `torch.profiler`. The row folder gets the main process's `trace.json`
(open it in Perfetto, ui.perfetto.dev, or chrome://tracing) and `top_ops.txt` (PyTorch's table);
the row's result gets the top operators by self time (device time on a GPU, CPU time elsewhere),
per optimizer step, which bench.md lists and MLflow keeps beside the traces, and every rank's
communication time per step: how long its collectives took from start to end (NCCL kernels on a GPU,
gloo's collectives elsewhere), which includes waiting for the slowest rank to join.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PROFILED_STEPS = 2
TOP_OPS = 15
TRACE_FILE, TABLE_FILE = "trace.json", "top_ops.txt"


def profile_steps(run_step: Callable[[int], None], device: torch.device, out: Path, record: bool) -> dict:
    """Run `PROFILED_STEPS` optimizer steps (`run_step(i)`) under the profiler on every rank (they share
    collectives). Returns {"comm_ms_per_step": ...}; on the main process (`record`) also "top_ops",
    with its trace and table written to `out`."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(PROFILED_STEPS):
            run_step(i)
        if cuda:
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    result = {"comm_ms_per_step": communication_ms(averages, cuda) / PROFILED_STEPS}
    if record:
        prof.export_chrome_trace(str(out / TRACE_FILE))
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        (out / TABLE_FILE).write_text(averages.table(sort_by=sort_by, row_limit=40) + "\n")
        result["top_ops"] = top_ops(averages, sort_by, PROFILED_STEPS)
    return result


def communication_ms(averages, cuda: bool) -> float:
    """Milliseconds spent in collectives. gloo runs each on its own thread, recorded as one "gloo:<op>"
    event from start to completion (no self time of its own); NCCL as device kernels "nccl...".
    Single-process rows have none: 0."""
    if cuda:
        return sum(e.self_device_time_total for e in averages if e.key.startswith("nccl")) / 1e3
    return sum(e.cpu_time_total for e in averages if e.key.startswith("gloo:")) / 1e3


def top_ops(averages, attribute: str, steps: int, limit: int = TOP_OPS) -> list[dict]:
    """The operators with the most self time: name, calls and milliseconds per step, share of all."""
    total = sum(getattr(event, attribute) for event in averages) or 1.0
    ranked = sorted(averages, key=lambda event: getattr(event, attribute), reverse=True)[:limit]
    return [
        {
            "op": event.key,
            "calls_per_step": event.count / steps,
            "self_ms_per_step": getattr(event, attribute) / 1e3 / steps,  # the profiler counts microseconds
            "share": getattr(event, attribute) / total,
        }
        for event in ranked
    ]


def profile_table(rows: list[dict], label: Callable[[dict], str], shown: int = 10) -> str:
    """bench.md's section: per profiled row, its top operators."""
    parts = []
    for row in rows:
        if not row.get("top_ops"):
            continue
        lines = [f"**{label(row)}** (trace: `{row['trace']}`)", "", "| op | calls/step | self ms/step | share |"]
        lines.append("|---|---|---|---|")
        lines += [
            f"| `{op['op']}` | {op['calls_per_step']:g} | {op['self_ms_per_step']:.1f} | {100 * op['share']:.1f}% |"
            for op in row["top_ops"][:shown]
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
