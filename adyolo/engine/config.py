"""Config sections of the training engine: optimisation, schedule, precision, checkpoints, logging."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from adyolo.schema import ConfigError


@dataclass
class OptimConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD (momentum, Nesterov) as in YOLOv5, or AdamW."""
    lr: float = 0.01
    """Peak learning rate."""
    final_lr_ratio: float = 0.01
    """Learning rate at the last epoch, as a fraction of `lr`."""
    schedule: Literal["cosine", "linear"] = "cosine"
    """Decay from `lr` to `lr * final_lr_ratio` over the epochs after warm-up."""
    momentum: float = 0.937
    """SGD momentum / AdamW beta1."""
    weight_decay: float = 5e-4
    """Decay for conv/linear weights, scaled by global_batch / 64 as in YOLOv5; never on BN or biases."""
    warmup_epochs: float = 3.0
    """Linear warm-up of the learning rate (and of SGD momentum from `warmup_momentum`)."""
    warmup_min_steps: int = 100
    """Warm-up lasts at least this many optimizer steps."""
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    """Biases start warm-up at this learning rate and fall to `lr` (YOLOv5)."""
    grad_clip: float = 10.0
    """Clip the global gradient norm (0: off). Under DeepSpeed, set `gradient_clipping` in its JSON."""

    def __post_init__(self) -> None:
        # What torch.optim would refuse (or take and train on with NaN) is refused here, with its key.
        numbers = ("lr", "final_lr_ratio", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum")
        for key in (*numbers, "warmup_bias_lr", "grad_clip"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(key, f"{getattr(self, key)} must be a finite number")
        for key in ("lr", "final_lr_ratio", "weight_decay", "warmup_epochs", "grad_clip", "warmup_bias_lr"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"{getattr(self, key)} must not be negative")
        if self.lr == 0:
            raise ConfigError("lr", "0 would never update the weights")
        # 0 is plain SGD without momentum (no Nesterov, no momentum warm-up); see `build_optimizer`.
        for key in ("momentum", "warmup_momentum"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(key, f"{getattr(self, key)} must be in [0, 1)")


@dataclass
class TrainConfig:
    global_batch: int = 40
    """Images per optimizer step across all ranks = micro_batch x ranks x accumulation."""
    micro_batch: int | Literal["auto"] | None = None
    """Images per rank per forward pass. None: global_batch / ranks. "auto": the largest that fits the GPU."""
    memory_budget_gib: float | None = None
    """The per-rank memory that `micro_batch: auto` and `model.checkpoint: auto` must fit, GiB. None: the
    GPU's memory, or on a CPU the available RAM shared by this machine's ranks."""
    auto_batch_memory_fraction: float = 0.9
    """micro_batch auto on a GPU: the share of the GPU the probe step that confirms the plan may use; the
    rest is held back for what a bare step on one GPU does not allocate (DDP buckets, ZeRO buffers,
    pinned batches, fragmentation)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast (weights and BatchNorm stay fp32) or fp32. auto: bf16 on CUDA and on a CPU with native
    bf16 (AVX512-BF16 or AMX, where it is faster; docs/measurements.md), fp32 on other CPUs; under DeepSpeed the
    JSON's choice, which an explicit value must agree with."""
    ema_decay: float = 0.9999
    """Weight EMA decay, ramped up as 1 - exp(-updates / ema_ramp) (YOLOv5)."""
    ema_ramp: float = 2000.0
    eval_interval: int = 1
    """Evaluate the EMA weights every this many epochs (and after the last)."""
    fitness: Literal["ap_hard", "ap_medium", "ap_easy", "map50"] = "ap_hard"
    """The validation metric that picks best.pt and drives early stopping."""
    patience: int = 30
    """Stop when `fitness` has not improved for this many evaluations (0: never)."""
    seed: int = 0
    """Seeds model init, data order and augmentation (per rank and worker)."""
    log_interval: int = 10
    """Optimizer steps between metric logs (all ranks report memory)."""
    save_interval: int = 0
    """Optimizer steps between resumable checkpoints (0: at the end of every epoch only)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept on disk (the newest ones)."""
    max_nonfinite_steps: int = 10
    """Consecutive steps with a non-finite loss before the run saves and stops."""
    channels_last: bool | Literal["auto"] = "auto"
    """Run convolutions in channels_last memory format. auto: on for bf16 on a CPU (oneDNN's bf16
    convolutions are fastest in it), off otherwise; resolved at start and saved resolved."""
    compile: bool = False
    """torch.compile the training forward (in place; evaluation and the EMA copy stay eager)."""
    sync_batchnorm: bool = False
    """Synchronise BatchNorm statistics across ranks in forward (CUDA only)."""
    timeout_s: int = 600
    """Collective timeout: a dead rank fails the job after this long instead of hanging it."""
    init_weights: str | None = None
    """Start from these weights rather than random ones: an adyolo best.pt / last.pt, or a YOLOv5-Face
    checkpoint or state dict (docs/weights.md). Every tensor whose name and shape fit is loaded; the run
    prints and logs (MLflow `init.*`) what was loaded and what stayed random, and why. Ignored on resume."""

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise ConfigError("global_batch", f"{self.global_batch} must be at least 1")
        if isinstance(self.micro_batch, int) and not 1 <= self.micro_batch <= self.global_batch:
            raise ConfigError(
                "micro_batch", f"{self.micro_batch} must be between 1 and global_batch ({self.global_batch})"
            )
        for key in ("eval_interval", "log_interval", "max_nonfinite_steps", "timeout_s", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"{getattr(self, key)} must be at least 1")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ConfigError("memory_budget_gib", f"{self.memory_budget_gib} must be positive")
        if not 0 < self.auto_batch_memory_fraction <= 1:
            raise ConfigError("auto_batch_memory_fraction", f"{self.auto_batch_memory_fraction} must be in (0, 1]")
        if not 0 < self.ema_decay < 1:
            raise ConfigError("ema_decay", f"{self.ema_decay} must be in (0, 1)")


@dataclass
class LogConfig:
    experiment: str = "adyolo"
    """MLflow experiment name."""
    tracking_uri: str | None = None
    """MLflow store. None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    run_name: str | None = None
    """None: what ran, e.g. `efficient-n-256px-1cpu` or `full-sdpa-s-640px-16gpu-zero2`."""
    num_val_images: int = 4
    """Validation images drawn with their predictions and ground truth at every evaluation (the same ones
    each time) and logged as artifacts."""
    memory_plan: bool = True
    """Predict this run's per-rank memory at start (`adyolo.plan`; traced once per configuration, then
    cached) and log it beside the measured peaks. Always on when a setting is `auto`."""
    phase_times: bool = True
    """Time the run's phases (data wait, forward, loss, backward, optimizer + EMA, validation, checkpoints,
    logging), print the breakdown at the end and log it under `time/`. On a GPU this synchronises the
    device at each phase boundary (a few percent slower)."""
    progress_interval_s: float = 30.0
    """Where the output is not a terminal (Slurm logs, nohup, CI), a plain progress line this often (and one
    at the end of every epoch) instead of a redrawn bar."""
    system_metrics: bool = True
    """MLflow system metrics (CPU, RAM, disk, network; GPUs where nvidia-ml-py is installed) of the main
    process's node, sampled every 10 s, under `system/` in the run."""

    def __post_init__(self) -> None:
        if self.progress_interval_s <= 0:
            raise ConfigError("progress_interval_s", f"{self.progress_interval_s} must be positive")
