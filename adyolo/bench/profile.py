"""`launch/bench.py --profile`: where a row's training step spends its time, operator by operator.

After a row's timed steps (so the profiler never slows what is timed), its ranks run `PROFILED_STEPS`
more optimizer steps under `torch.profiler` on the main process. The row folder gets `trace.json`
(open it in Perfetto, ui.perfetto.dev, or chrome://tracing) and `top_ops.txt` (PyTorch's table);
the row's result gets the top operators by self time (device time on a GPU, CPU time elsewhere),
per optimizer step, which bench.md lists and MLflow keeps beside the traces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PROFILED_STEPS = 2
TOP_OPS = 15
TRACE_FILE, TABLE_FILE = "trace.json", "top_ops.txt"


def profile_steps(run_step: Callable[[int], None], device: torch.device, out: Path, record: bool) -> list[dict]:
    """Run `PROFILED_STEPS` optimizer steps (`run_step(i)`, on every rank: they share collectives);
    with `record` (the main process) trace them and return the top operators, else []."""
    if not record:
        for i in range(PROFILED_STEPS):
            run_step(i)
        return []
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(PROFILED_STEPS):
            run_step(i)
        if cuda:
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(str(out / TRACE_FILE))
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    (out / TABLE_FILE).write_text(averages.table(sort_by=sort_by, row_limit=40) + "\n")
    return top_ops(averages, sort_by, PROFILED_STEPS)


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
