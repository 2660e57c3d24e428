"""A training run's own plan: `train.micro_batch: auto` and `model.checkpoint: auto` chosen from it,
and its predicted per-rank memory logged beside the measured peaks.

`plan_run` runs before the Accelerator exists (its gradient accumulation is fixed at construction). It
predicts the run's setting on this device: on a GPU what `torch.cuda.max_memory_allocated` and the whole
device will show; on a CPU the live tensor bytes, plus this process's memory before the model exists
(the framework, measured here), which together predict the process's peak RSS that the trainer logs.
With a setting `auto`, it takes the least recompute, then the fewest accumulation steps, that fit
`train.memory_budget_gib` per rank (default: the GPU's memory, or the available RAM shared by this
machine's ranks), keeping the global batch exact.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from adyolo.config import RunConfig
from adyolo.engine.accelerator import LaunchSettings
from adyolo.engine.batching import BatchSplit, micro_batch_candidates, split_global_batch
from adyolo.plan.planner import CHECKPOINT_LADDER, Planner, Prediction, Setting, checkpoint_name
from adyolo.plan.terms import GIB, ZeroSettings
from adyolo.schema import ConfigError


@dataclass
class RunPlan:
    """On a CPU two figures: the peak RSS (what the trainer logs; untouched pages of a buffer take none)
    and the peak of private writable memory (what a per-process limit, RLIMIT_DATA, counts: every
    allocation, touched or not, as a GPU counts it)."""

    prediction: Prediction
    auto: tuple[str, ...]  # the settings the plan chose
    budget_gib: float | None  # what they had to fit
    process_baseline: float = 0.0  # CPU: resident bytes of this process that are not tensors
    data_baseline: float = 0.0  # CPU: private writable bytes of this process that are not tensors

    def measure_baseline(self, live_tensor_bytes: int) -> None:
        """On a CPU: this process's memory now minus the tensors alive in it, i.e. the framework,
        libraries, loaders and logging that its peak holds beside the step's tensors."""
        if self.prediction.device == "cpu":
            resident, private = process_memory()
            self.process_baseline = max(0.0, resident - live_tensor_bytes)
            self.data_baseline = max(0.0, private - live_tensor_bytes)

    @property
    def predicted_peak(self) -> float:
        """Bytes: device memory on a GPU (reserved + outside PyTorch); on a CPU the peak RSS (the tensors'
        resident bytes and this process's non-tensor memory)."""
        if self.prediction.device == "gpu":
            return self.prediction.device_total
        return self.prediction.resident + self.process_baseline

    @property
    def predicted_budget_use(self) -> float:
        """Bytes a per-rank budget must hold: the GPU's memory, or a CPU process's private writable memory."""
        if self.prediction.device == "gpu":
            return self.prediction.device_total
        return self.prediction.allocated + self.data_baseline

    def summary(self) -> str:
        """One line for the terminal: the setting, how it was chosen, the predicted peak."""
        p = self.prediction
        chosen = f" (auto: {', '.join(self.auto)}, within {self.budget_gib:.1f} GiB)" if self.auto else ""
        what = "device memory" if p.device == "gpu" else "peak RSS"
        return f"memory plan: {p.setting}{chosen}; predicted {what} per rank {self.predicted_peak / GIB:.2f} GiB"

    def params(self) -> dict[str, object]:
        """For MLflow, beside the measured `memory/*` peaks (GiB)."""
        p, s = self.prediction, self.prediction.setting
        params = {
            "plan.device": p.device,
            "plan.setting": str(s),
            "plan.auto": ",".join(self.auto) or "none",
            "plan.budget_gib": "none" if self.budget_gib is None else round(self.budget_gib, 2),
            "plan.predicted_allocated_gib": round(p.allocated / GIB, 3),
        }
        if p.device == "gpu":
            params["plan.predicted_reserved_gib"] = round(p.reserved / GIB, 3)
            params["plan.predicted_device_gib"] = round(p.device_total / GIB, 3)
        else:
            params["plan.process_baseline_gib"] = round(self.process_baseline / GIB, 3)
            params["plan.predicted_rss_gib"] = round(self.predicted_peak / GIB, 3)
            params["plan.predicted_private_gib"] = round(self.predicted_budget_use / GIB, 3)
        return params


def zero_from(launch: LaunchSettings) -> ZeroSettings:
    ds = launch.deepspeed
    if ds is None:
        return ZeroSettings(stage=0)
    return ZeroSettings(ds.stage, ds.offload_optimizer, ds.reduce_bucket_size, ds.prefetch_bucket_size)


def plan_run(cfg: RunConfig, launch: LaunchSettings, main_process: bool) -> tuple[RunConfig, RunPlan | None]:
    """-> (the config with `auto` settings resolved, this run's plan or None when nothing asked for one).

    Every rank resolves `auto` the same way (the traces are cached and deterministic); without `auto`
    only the main process plans, for the log. Raises ConfigError when no setting fits the budget."""
    auto = tuple(
        name
        for name, is_auto in (
            ("train.micro_batch", cfg.train.micro_batch == "auto"),
            ("model.checkpoint", cfg.model.checkpoint == "auto"),
        )
        if is_auto
    )
    if not auto and not (cfg.log.memory_plan and main_process):
        return cfg, None
    device = "gpu" if torch.cuda.is_available() else "cpu"
    # On a CPU, the process's private memory before the model: the auto budget must hold it too (the
    # logged prediction re-measures both baselines just before training, `measure_baseline`).
    resident, private = process_memory() if device == "cpu" else (0.0, 0.0)
    zero, world, global_batch = zero_from(launch), launch.world_size, cfg.train.global_batch
    if not auto:
        split = split_global_batch(global_batch, world, cfg.train.micro_batch)
        return cfg, plan_setting(cfg, launch, split, device, resident, private)
    model = cfg.model if cfg.model.checkpoint != "auto" else dataclasses.replace(cfg.model, checkpoint=[])
    planner = Planner(model, cfg.loss, cfg.optim, cfg.train, launch.precision)

    budget = cfg.train.memory_budget_gib or default_budget_gib(launch.local_world_size)
    fixed_micro = (
        None
        if cfg.train.micro_batch == "auto"
        else split_global_batch(global_batch, world, cfg.train.micro_batch).micro_batch
    )
    checkpoints = (
        tuple(CHECKPOINT_LADDER)
        if cfg.model.checkpoint == "auto"
        else (checkpoint_name(cfg.model.checkpoint, cfg.model),)
    )
    chosen = planner.recommend(
        global_batch,
        world,
        zero,
        budget - private / GIB,
        device,
        checkpoints,
        None if fixed_micro is None else (fixed_micro,),
    )
    if chosen is None:
        fewest = split_global_batch(global_batch, world, micro_batch_candidates(global_batch, world)[-1])
        least = planner.predict(Setting(fewest.micro_batch, fewest.accumulation, checkpoints[-1]), world, zero, device)
        raise ConfigError(
            auto[0],
            f"auto: nothing fits {budget:.1f} GiB per rank; the least memory (micro-batch {fewest.micro_batch}, "
            f"checkpointing {checkpoints[-1]}) is predicted at {(least.device_total + private) / GIB:.1f} GiB. "
            "Use more ranks, a smaller model.img_size or model.size, or raise train.memory_budget_gib",
        )
    setting = chosen.setting
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, micro_batch=setting.micro_batch),
        model=dataclasses.replace(cfg.model, checkpoint=list(setting.blocks_for(cfg.model))),
    )
    return cfg, RunPlan(chosen, auto, budget, resident, private)


def plan_setting(
    cfg: RunConfig, launch: LaunchSettings, split: BatchSplit, device: str, resident: float = 0.0, private: float = 0.0
) -> RunPlan:
    """The plan of a run whose setting is fixed: its config's checkpointing at `split`, on `device`
    ("gpu" | "cpu"); `resident` and `private`: this process's memory so far (CPU)."""
    planner = Planner(cfg.model, cfg.loss, cfg.optim, cfg.train, launch.precision)
    setting = Setting(split.micro_batch, split.accumulation, checkpoint_name(cfg.model.checkpoint, cfg.model))
    prediction = planner.predict(setting, split.world_size, zero_from(launch), device)
    return RunPlan(prediction, (), None, resident, private)


def process_memory() -> tuple[float, float]:
    """This process's resident and private writable memory (Linux VmData; elsewhere the resident)."""
    resident = float(psutil.Process().memory_info().rss)
    try:
        status = Path("/proc/self/status").read_text()
        private = float(next(line.split()[1] for line in status.splitlines() if line.startswith("VmData:"))) * 1024
    except (OSError, StopIteration):
        private = resident
    return resident, private


def default_budget_gib(local_ranks: int) -> float:
    """The GPU's memory, or on a CPU the available RAM shared by this machine's ranks."""
    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.get_device_properties(device).total_memory / GIB
    return psutil.virtual_memory().available / GIB / max(local_ranks, 1)
