"""The plan checked against real training steps where the measurement is exact.

On the CPU: the live tensor bytes of real steps (MemTracker on real tensors) in one process, and per
rank in real 2-process DDP / ZeRO runs (`adyolo.plan.measure` through `accelerate launch`); and CUDA
autocast's policy as the GPU plan traces it on the CPU against CUDA's own (a forward and loss on fake
CUDA tensors, which need no GPU). On a GPU: `torch.cuda.max_memory_allocated` of a real step against
the GPU prediction's allocated bytes.
`launch/plan.py --validate` runs the CPU matrix below and writes the table docs/memory-plan.md quotes; the
tests run a part of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from adyolo.config import RunConfig, load_run_config
from adyolo.data.batch import synthetic_batch
from adyolo.engine.accelerator import DS_CONFIGS
from adyolo.engine.setup import bare_step
from adyolo.loss.config import LossConfig
from adyolo.model import ModelConfig
from adyolo.plan.main import zero_settings
from adyolo.plan.planner import Planner, Setting, checkpoint_name, ladder_blocks
from adyolo.plan.terms import ZeroSettings
from adyolo.plan.trace import fake_cuda_available, trace_forward, trace_step

# One process: fusion, attention, checkpointing, precision, image size, micro-batches of the real steps.
ONE_PROCESS = [
    ("full", "sdpa", "off", "fp32", 64, (3, 6)),
    ("full", "explicit", "selected", "bf16", 96, (5,)),
    ("efficient", "sdpa", "all", "fp32", 96, (3,)),
    ("efficient", "sdpa", "off", "bf16", 64, (6,)),
    ("full", "sdpa", "all", "bf16", 96, (5,)),
    ("full", "explicit", "off", "fp32", 64, (3,)),
    ("full", "sdpa", "selected", "fp32", 160, (3, 6)),
    ("efficient", "sdpa", "selected", "bf16", 160, (3, 6)),
    ("full", "explicit", "all", "fp32", 160, (3,)),
]
# Several ranks: ZeRO stage ("0": DDP), ranks, model size.
RANKS = [("0", 2, "n"), ("1", 2, "n"), ("2", 2, "n"), ("3", 2, "n"), ("2", 2, "s"), ("3", 2, "s"), ("2", 4, "n")]
RANK_IMG = 64
# CUDA autocast's policy: fusion, attention, neck, at size s, 640 px, 2 images (what the GPU table plans).
CUDA_POLICY = [
    ("full", "explicit", "gd"),
    ("full", "sdpa", "gd"),
    ("efficient", "sdpa", "gd"),
    ("efficient", "sdpa", "yolov5face"),
]


def check_one_process(
    fusion: str, attention: str, checkpoint: str, precision: str, img: int, micro_batches, cache_dir: Path
) -> list[dict]:
    """Rows of predicted and measured peak bytes of one process's real steps."""
    cfg = RunConfig(model=ModelConfig(size="n", fusion=fusion, attention=attention, img_size=img))
    planner = Planner(cfg.model, cfg.loss, cfg.optim, cfg.train, precision, cache_dir=cache_dir)
    model = dataclasses.replace(cfg.model, checkpoint=list(ladder_blocks(checkpoint, cfg.model)))
    rows = []
    for micro in micro_batches:
        predicted = planner.predict(Setting(micro, 1, checkpoint), 1, ZeroSettings(0), device="cpu").allocated
        measured = trace_step(model, cfg.loss, cfg.optim, cfg.train, micro, precision, fake=False).peak_bytes
        variant = f"{fusion}/{attention}" if fusion == "full" else fusion
        rows.append(_row(f"{variant} ckpt={checkpoint} {precision} {img}px", 1, "-", micro, predicted, measured))
    return rows


def check_ranks(zero: str, world_size: int, size: str, cache_dir: Path) -> list[dict]:
    """Rows of predicted and measured peak bytes of every rank of a real `world_size`-process run."""
    overrides = [f"model.size={size}", f"model.img_size={RANK_IMG}", "model.fusion=full"]
    overrides.append(f"train.global_batch={2 * world_size}")
    launcher = "ddp" if zero == "0" else f"zero{zero}"
    with tempfile.TemporaryDirectory() as folder:
        command = [
            str(Path(sys.executable).with_name("accelerate")),
            "launch",
            *("--config_file", str(DS_CONFIGS / f"accelerate_{launcher}.yaml")),
            *("--num_processes", str(world_size), "--main_process_port", "0"),
            *("-m", "adyolo.plan.measure", json.dumps(overrides), folder),
        ]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
        measured = [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in range(world_size)]
    cfg = load_run_config(None, overrides)
    planner = Planner(cfg.model, cfg.loss, cfg.optim, cfg.train, "fp32", cache_dir=cache_dir)
    predicted = planner.predict(Setting(2, 1, "off"), world_size, zero_settings(zero), device="cpu").allocated
    name = f"full/sdpa size {size} {RANK_IMG}px {'DDP' if zero == '0' else f'ZeRO-{zero}'}"
    return [_row(name, world_size, m["rank"], 2, predicted, m["peak_bytes"]) for m in measured]


def check_cuda_policy(
    fusion: str, attention: str, neck: str, size: str = "s", img: int = 640, micro_batch: int = 2
) -> dict:
    """A row: the activation memory a bf16 forward and loss leave for backward, traced on the CPU with
    CUDA's autocast policy as the GPU plan does ("predicted"), against fake CUDA tensors under CUDA's own
    autocast ("measured")."""
    model = ModelConfig(size=size, fusion=fusion, attention=attention, neck=neck, img_size=img)
    emulated = trace_forward(model, LossConfig(), micro_batch, device="cpu", policy="cuda").saved_bytes
    cuda = trace_forward(model, LossConfig(), micro_batch, device="cuda", policy="cuda").saved_bytes
    variant = "yolov5face" if neck == "yolov5face" else (f"full/{attention}" if fusion == "full" else fusion)
    return _row(f"forward, CUDA autocast: {variant} {size} {img}px", 1, "-", micro_batch, emulated, cuda)


def check_gpu(model: ModelConfig, micro_batch: int, precision: str, cache_dir: Path) -> dict:
    """One process on this CUDA device: a real step's `max_memory_allocated` against the prediction."""
    cfg = RunConfig(model=model)
    device = torch.device("cuda")
    planner = Planner(model, cfg.loss, cfg.optim, cfg.train, precision, cache_dir=cache_dir)
    predicted = planner.predict(Setting(micro_batch, 1, checkpoint_name(model.checkpoint, model)), 1, ZeroSettings(0))
    dtype = torch.bfloat16 if precision == "bf16" else None
    step = bare_step(model, cfg.loss, cfg.optim, cfg.train, device, dtype)
    batches = itertools.repeat(synthetic_batch(micro_batch, model.img_size, device))
    step.run_window(batches, step=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step.run_window(batches, step=1)
    torch.cuda.synchronize()
    row = _row(f"{model.fusion} {precision} {model.img_size}px", 1, "-", micro_batch, predicted.allocated, 0)
    row["measured_bytes"] = torch.cuda.max_memory_allocated()
    row["error"] = predicted.allocated / row["measured_bytes"] - 1
    row["predicted_reserved_bytes"] = predicted.reserved
    row["measured_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return row


def _row(name: str, world_size: int, rank, micro_batch: int, predicted: float, measured: int) -> dict:
    error = predicted / measured - 1 if measured else float("nan")
    return {
        "configuration": name,
        "world_size": world_size,
        "rank": rank,
        "micro_batch": micro_batch,
        "predicted_bytes": predicted,
        "measured_bytes": measured,
        "error": error,
    }


def validate_cpu(cache_dir: Path) -> list[dict]:
    """The whole CPU matrix (a few minutes on 2 cores)."""
    rows = [row for config in ONE_PROCESS for row in check_one_process(*config, cache_dir=cache_dir)]
    rows += [row for zero, world, size in RANKS for row in check_ranks(zero, world, size, cache_dir)]
    if fake_cuda_available():  # a CUDA build of torch (no GPU needed)
        rows += [check_cuda_policy(*variant) for variant in CUDA_POLICY]
    return rows


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| configuration | ranks | rank | micro-batch | predicted MiB | measured MiB | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['configuration']} | {r['world_size']} | {r['rank']} | {r['micro_batch']} | "
            f"{r['predicted_bytes'] / mib:.1f} | {r['measured_bytes'] / mib:.1f} | {r['error']:+.1%} |"
        )
    worst = max(abs(r["error"]) for r in rows)
    return "\n".join(lines) + f"\n\nlargest error: {worst:.1%} over {len(rows)} measurements\n"
