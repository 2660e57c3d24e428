"""The plan behind `launch/plan.py`: for a run config, every variant's predicted memory per micro-batch
and checkpointing, and the recommended setting per number of GPUs and GPU size."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from adyolo.config import RunConfig
from adyolo.engine.accelerator import DS_CONFIGS, read_deepspeed_config
from adyolo.engine.batching import BatchSplitError
from adyolo.plan.cost import step_memory
from adyolo.plan.planner import CHECKPOINT_LADDER, Planner, Prediction, Setting, model_blocks
from adyolo.plan.report import curve_table, plot, prediction_dict, recommendation_table
from adyolo.plan.terms import GIB, GpuAssumptions, ZeroSettings

# The detector's two fusion variants and the explicit-attention reference.
VARIANTS = {
    "full/sdpa": {"fusion": "full", "attention": "sdpa"},
    "full/explicit": {"fusion": "full", "attention": "explicit"},
    "efficient": {"fusion": "efficient"},
}
GPU_SIZES_GIB = [16.0, 24.0, 32.0, 40.0, 80.0, 141.0]


@dataclass
class PlanRequest:
    """What `launch/plan.py` asks for (its flags)."""

    gpus: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8, 12, 16, 32])  # uneven splits included
    gpu_memory_gib: list[float] = field(default_factory=lambda: list(GPU_SIZES_GIB))
    zero: str = "2"  # the ds_configs/zero<N>.json to plan with; "0": plain DDP
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    precision: str = "bf16"
    device: str = "gpu"  # "cpu": a CPU process per rank, its private writable memory against the budget
    # CPU: a training process's private writable memory besides tensors (torch, DeepSpeed, accelerate,
    # MLflow loaded), as a 2-process ZeRO-2 benchmark rank holds it (docs/measurements.md).
    cpu_process_gib: float = 1.05
    gpu: GpuAssumptions = field(default_factory=GpuAssumptions)
    cache_dir: Path | None = None
    out: Path | None = None  # where plan.md, plan.json and plan.png go (None: nowhere)


@dataclass
class Plan:
    title: str
    curves: dict[str, list[Prediction]]  # variant -> one GPU, every checkpointing and micro-batch
    grid: dict[tuple[str, int], dict[float, Prediction | None]]  # (variant, GPUs) -> GPU GiB -> setting
    request: PlanRequest

    def markdown(self) -> str:
        sizes = self.request.gpu_memory_gib
        return (
            f"# {self.title}\n\nRecommended setting (micro-batch x accumulation, checkpointing) per number "
            f"of ranks and memory per rank, with its predicted memory per rank, GiB:\n\n"
            f"{recommendation_table(self.grid, sizes)}\nPredicted memory of one rank by micro-batch:\n\n"
            f"{curve_table(self.curves, sizes)}{self.assumptions()}"
        )

    def assumptions(self) -> str:
        """The GPU terms a CPU trace cannot measure, as this plan assumed them."""
        if self.request.device != "gpu":
            return ""
        gpu = self.request.gpu
        allocator = "expandable segments" if gpu.expandable_segments else "default settings"
        return (
            f"\nAssumed on the GPU (adyolo/plan/terms.py): attention kernel +{gpu.attention_kernel_excess:.0%} "
            f"over the traced attention tensors (bf16), cuDNN/cuBLAS workspaces {gpu.workspace_gib:g} GiB "
            f"(allocated), allocator reserve x{gpu.reserve:.2f} ({allocator}), CUDA context "
            f"{gpu.cuda_context_gib:g} GiB, NCCL {gpu.nccl_gib:g} GiB per rank with several ranks.\n"
        )

    def as_dict(self) -> dict:
        return {
            "title": self.title,
            "assumptions": dataclasses.asdict(self.request.gpu),
            "curves": {name: [prediction_dict(p) for p in ps] for name, ps in self.curves.items()},
            "recommendations": [
                {"variant": name, "gpus": gpus, "gpu_gib": size, "setting": prediction_dict(p) if p else None}
                for (name, gpus), cells in self.grid.items()
                for size, p in cells.items()
            ],
        }


def zero_settings(zero: str) -> ZeroSettings:
    """The memory-relevant part of ds_configs/zero<zero>.json ("0": no DeepSpeed)."""
    if zero == "0":
        return ZeroSettings(stage=0)
    ds = read_deepspeed_config(DS_CONFIGS / f"zero{zero}.json")
    return ZeroSettings(ds.stage, ds.offload_optimizer, ds.reduce_bucket_size, ds.prefetch_bucket_size)


def make_plan(cfg: RunConfig, request: PlanRequest) -> Plan:
    """Trace what is not cached (in parallel, one process per core), then predict and recommend.

    The variants are the GD detector's; a config with `model.neck: yolov5face` (no fusion to vary) is
    planned as its one variant, `yolov5face`."""
    variants = {"yolov5face": {}} if cfg.model.neck == "yolov5face" else {n: VARIANTS[n] for n in request.variants}
    planners = {
        name: Planner(
            dataclasses.replace(cfg.model, **changes),
            cfg.loss,
            cfg.optim,
            cfg.train,
            request.precision,
            request.cache_dir,
            request.gpu,
            cpu_process_bytes=request.cpu_process_gib * GIB if request.device == "cpu" else 0.0,
        )
        for name, changes in variants.items()
    }
    _trace_in_parallel(planners, request.device)
    zero = zero_settings(request.zero)
    global_batch = cfg.train.global_batch
    curves = {
        name: [
            planner.predict(Setting(micro, 1, checkpoint), 1, zero, request.device)
            for checkpoint in CHECKPOINT_LADDER
            for micro in _curve_batches(global_batch)
        ]
        for name, planner in planners.items()
    }
    grid = {}
    for name, planner in planners.items():
        for gpus in request.gpus:
            try:
                grid[(name, gpus)] = {
                    size: planner.recommend(global_batch, gpus, zero, size, request.device)
                    for size in request.gpu_memory_gib
                }
            except BatchSplitError:
                continue  # a number of GPUs the global batch does not divide over
    m = cfg.model
    where = (
        "per GPU" if request.device == "gpu" else f"per CPU process (with {request.cpu_process_gib:g} GiB non-tensor)"
    )
    title = (
        f"Plan: size {m.size}, {m.img_size} px, global batch {global_batch}, {request.precision}, "
        f"{'DDP' if request.zero == '0' else f'ZeRO-{request.zero}'}, memory {where} (predicted)"
    )
    plan = Plan(title, curves, grid, request)
    if request.out is not None:
        request.out.mkdir(parents=True, exist_ok=True)
        (request.out / "plan.md").write_text(plan.markdown())
        (request.out / "plan.json").write_text(json.dumps(plan.as_dict(), indent=1))
        plot(curves, request.gpu_memory_gib, request.out / "plan.png", title)
    return plan


def _curve_batches(global_batch: int) -> list[int]:
    """Micro-batches to draw: powers of two up to the global batch, and the global batch itself."""
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b < global_batch]
    return [*batches, global_batch]


def _trace_in_parallel(planners: dict[str, Planner], device: str) -> None:
    """Fill the trace cache for every variant and checkpointing, one process per core (tracing is
    single-threaded Python); then each planner reads the cache."""
    policy = "cuda" if device == "gpu" else "cpu"
    jobs = [
        (
            dataclasses.replace(p.model, checkpoint=list(model_blocks(blocks, p.model))),
            p.loss,
            p.optim,
            p.train,
            p.precision,
            p.cache_dir,
            policy,
        )
        for p in planners.values()
        for blocks in CHECKPOINT_LADDER.values()
    ]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        # spawn: a forked child would inherit the parent's OpenMP state, which can hang.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_fill_cache, jobs))
    for planner in planners.values():
        for blocks in CHECKPOINT_LADDER.values():
            planner.step_memory(blocks, device)


def _fill_cache(job: tuple) -> None:
    step_memory(*job)
