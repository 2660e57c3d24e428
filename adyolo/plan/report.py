"""The plan for people and machines: tables (Markdown), a plot of memory against the micro-batch, JSON."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from adyolo.plan.planner import Prediction
from adyolo.plan.terms import GIB


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def curve_table(curves: dict[str, list[Prediction]], gpu_sizes: list[float]) -> str:
    """Per variant and checkpointing, per micro-batch on one rank: allocated, reserved and what the rank
    needs in all (GPU: reserved + memory outside PyTorch; CPU: tensors + the process), and the sizes
    that hold it."""
    lines = [
        "| configuration | micro-batch | allocated GiB | reserved GiB | per rank GiB | fits in |",
        "|---|---|---|---|---|---|",
    ]
    for name, predictions in curves.items():
        for p in predictions:
            fits = ", ".join(f"{s:g}" for s in gpu_sizes if p.fits(s)) or "none"
            lines.append(
                f"| {name} ckpt={p.setting.checkpoint} | {p.setting.micro_batch} | {gib(p.allocated)} | "
                f"{gib(p.reserved)} | {gib(p.device_total)} | {fits} |"
            )
    return "\n".join(lines) + "\n"


def recommendation_table(grid: dict[tuple[str, int], dict[float, Prediction | None]], gpu_sizes: list[float]) -> str:
    """Rows: variant and number of GPUs; columns: GPU sizes; cells: the recommended setting and its
    predicted per-rank memory on the GPU, or that nothing fits."""
    header = "| variant | ranks | " + " | ".join(f"{s:g} GiB" for s in gpu_sizes) + " |"
    lines = [header, "|---|---|" + "---|" * len(gpu_sizes)]
    for (name, gpus), cells in grid.items():
        row = []
        for size in gpu_sizes:
            p = cells[size]
            if p is None:
                row.append("does not fit")
            else:
                s = p.setting
                row.append(f"{s.micro_batch} x {s.accumulation}, ckpt {s.checkpoint}: {gib(p.device_total)}")
        lines.append(f"| {name} | {gpus} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def prediction_dict(p: Prediction) -> dict:
    return {
        **dataclasses.asdict(p.setting),
        "world_size": p.world_size,
        "zero": p.zero,
        "device": p.device,
        "allocated_gib": p.allocated / GIB,
        "reserved_gib": p.reserved / GIB,
        "device_total_gib": p.device_total / GIB,
        "terms_gib": {k: v / GIB for k, v in p.terms.items()},
    }


def plot(curves: dict[str, list[Prediction]], gpu_sizes: list[float], path: Path, title: str) -> Path:
    """Predicted memory on the GPU against the micro-batch, one line per configuration, the GPU sizes
    as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, predictions in curves.items():
        by_checkpoint: dict[str, list[Prediction]] = {}
        for p in predictions:
            by_checkpoint.setdefault(p.setting.checkpoint, []).append(p)
        for checkpoint, points in by_checkpoint.items():
            ax.plot(
                [p.setting.micro_batch for p in points],
                [p.device_total / GIB for p in points],
                marker="o",
                label=f"{name} ckpt={checkpoint}",
            )
    top = max(p.device_total / GIB for predictions in curves.values() for p in predictions)
    for size in gpu_sizes:
        if size <= top * 1.2:
            ax.axhline(size, color="grey", linestyle="--", linewidth=0.8)
            ax.text(0.5, size, f" {size:g} GiB", va="bottom", color="grey", fontsize=8)
    ax.set(xlabel="micro-batch (images per GPU per pass)", ylabel="predicted GiB on the GPU (per rank)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
