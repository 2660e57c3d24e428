"""One benchmark row on this rank: real training steps, timed, with the memory they took.

    python -m adyolo.bench.worker '<row spec as JSON>' <row folder>    # started by adyolo.bench.runner

The same Accelerator, DeepSpeed engine, model wrapping, optimizer, schedule, loss, EMA and `TrainStep`
as `launch/train.py`, on one synthetic batch kept on the device (so the data loader is not in the
measurement). The main process writes result.json; a rank that runs out of memory writes
oom-rank<r>.json and exits with `EXIT_OOM`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from adyolo.bench.grid import overrides
from adyolo.bench.profile import TRACE_FILE, profile_steps
from adyolo.bench.runner import EXIT_OOM
from adyolo.config import load_run_config
from adyolo.engine.accelerator import start_launch
from adyolo.engine.batching import synthetic_micro_batches
from adyolo.engine.cuda_allocator import configure_cuda_allocator
from adyolo.engine.host_memory import keep_freed_memory
from adyolo.engine.memory import FIELDS, snapshot
from adyolo.engine.setup import TrainingConfigs, prepare_training
from adyolo.model import build_model
from adyolo.plan.auto import plan_setting

GIB = 2**30
# How allocation failures read: CUDA's, and PyTorch's CPU allocator's (under a memory limit).
OUT_OF_MEMORY = ("out of memory", "can't allocate memory")
PLAN_FILE = "plan.json"  # the main process's prediction for the row, written before any step
# The schedule needs a length; the benchmark's few steps stay in its warm-up either way.
SCHEDULE_STEPS_PER_EPOCH = 1000


def measure(spec: dict, out: Path) -> int:
    """Run a row's training steps on this rank; the main process writes result.json. Returns the exit code."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = train_steps(spec, out)
    except torch.OutOfMemoryError as err:
        return record_oom(out, rank, err)
    except RuntimeError as err:  # DeepSpeed and NCCL rewrap some allocation failures; the CPU's own
        if not any(sign in str(err).lower() for sign in OUT_OF_MEMORY):
            raise
        return record_oom(out, rank, err)
    if result is not None:
        (out / "result.json").write_text(json.dumps(result))
    return 0


def record_oom(out: Path, rank: int, err: BaseException) -> int:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    (out / f"oom-rank{rank}.json").write_text(json.dumps({"oom": message[:200], "oom_rank": rank}))
    return EXIT_OOM


def train_steps(spec: dict, out: Path) -> dict | None:
    """Warm-up and timed optimizer steps; the result (main process) or None (other ranks)."""
    cfg = load_run_config(spec["config"], overrides(spec, spec))
    keep_freed_memory()  # as launch/train.py does
    configure_cuda_allocator()  # likewise, before anything starts CUDA
    launch, accelerator = start_launch(cfg.train, cfg.optim, out)
    split, precision, zero_stage = launch.split, launch.precision, launch.zero_stage
    device = accelerator.device
    budget = spec["memory_budget_gib"]
    if budget and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * GIB / total), device)
    elif budget:
        # A smaller machine: this process's private writable memory (heap, tensors) may not exceed the
        # budget; an allocation beyond it fails as on a GPU that is full.
        limit = int(budget * GIB)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.manual_seed(0)
    configs = TrainingConfigs(cfg.model, cfg.loss, cfg.optim, cfg.train)
    prepared = prepare_training(
        build_model(cfg.model), configs, accelerator, launch, epochs=1, steps_per_epoch=SCHEDULE_STEPS_PER_EPOCH
    )
    if accelerator.is_main_process:
        (out / PLAN_FILE).write_text(json.dumps(predict_row(cfg, launch.settings, split, prepared.step, device)))
    # Each rank its own micro-batches (an uneven split gives some ranks one image more).
    batches = synthetic_micro_batches(split, accelerator.process_index, cfg.model.img_size, device)

    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        _synchronize(device)
        start = time.perf_counter()
        prepared.step.run_window(batches, step=i)
        _synchronize(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    profiled = {}
    if spec.get("profile"):  # after the timed steps, which the profiler must not slow
        run_step = lambda i: prepared.step.run_window(batches, step=spec["warmup"] + spec["steps"] + i)  # noqa: E731
        profiled = profile_steps(run_step, device, out, record=accelerator.is_main_process)
    # Per rank: its median step and, when profiled, its time in collectives per step.
    timing = torch.tensor([statistics.median(times) * 1e3, profiled.get("comm_ms_per_step", -1.0)], device=device)
    timing = accelerator.gather(timing[None]).cpu()
    memory = accelerator.gather(snapshot(device).to(device)[None]).cpu()
    slowest = float(timing[:, 0].max()) / 1e3
    # Every rank past its last collective before any tears the process group down: a gloo rank
    # whose peer is already gone can abort at exit.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    ranks = [dict(zip(FIELDS, values)) for values in memory.tolist()]
    for rank, (step_ms, comm_ms) in zip(ranks, timing.tolist()):
        rank["ms_per_step"] = step_ms
        if comm_ms >= 0:
            rank["comm_ms_per_step"] = comm_ms
    return {
        "world_size": split.world_size,
        "micro_batch": split.micro_batch,
        # "3/2": an uneven split's largest and smallest micro-batch
        "micro_batches": "/".join(
            map(str, sorted({split.micro_batch, split.micro_sizes(split.world_size - 1)[-1]}, reverse=True))
        ),
        "accumulation": split.accumulation,
        "precision_resolved": precision,
        "zero_stage": zero_stage,
        "ms_per_step": 1000 * slowest,
        "images_per_s": split.global_batch / slowest,
        "ranks": ranks,
        "peak_allocated_gib": max(r["peak_allocated_gib"] for r in ranks),
        "peak_reserved_gib": max(r["peak_reserved_gib"] for r in ranks),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **({"top_ops": profiled["top_ops"], "trace": str(out / TRACE_FILE)} if profiled else {}),
    }


def predict_row(cfg, launch, split, step, device: torch.device) -> dict:
    """The memory plan's per-rank prediction for this row (GiB): on a GPU what max_memory_allocated and
    the device show; on a CPU the tensors, plus this process's non-tensor memory measured now, i.e. the
    peak RSS."""
    run_plan = plan_setting(cfg, launch, split, "gpu" if device.type == "cuda" else "cpu")
    run_plan.measure_baseline(step.weight_bytes())
    return {
        "predicted_allocated_gib": run_plan.prediction.allocated / GIB,
        "predicted_peak_gib": run_plan.predicted_peak / GIB,
        "predicted_budget_use_gib": run_plan.predicted_budget_use / GIB,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str]) -> None:
    spec, out = json.loads(argv[0]), Path(argv[1])
    code = measure(spec, out)
    # Everything is written. Skip interpreter finalisation, where gloo's worker threads can still
    # hold tensors and abort the process (SIGABRT) on CPU runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
