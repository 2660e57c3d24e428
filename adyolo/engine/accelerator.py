"""Build the Accelerator: process group, precision, DeepSpeed, batch split. The only place that
decides how the run is distributed; everything is checked before a process group exists."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from adyolo.engine.autobatch import largest_fitting
from adyolo.engine.batching import BatchSplit, micro_batch_candidates, split_global_batch
from adyolo.engine.config import OptimConfig, TrainConfig
from adyolo.schema import ConfigError

# The DeepSpeed JSONs and accelerate configs that ship with the project (one per ZeRO stage).
DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class Launch:
    """What the launcher asked for, read from the environment `accelerate launch` sets up."""

    world_size: int
    deepspeed_config: Path | None  # the DeepSpeed JSON, when running under DeepSpeed

    @classmethod
    def from_environment(cls) -> Launch:
        use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        return cls(int(os.environ.get("WORLD_SIZE", "1")), Path(ds_file) if use_ds and ds_file else None)


@dataclass(frozen=True)
class DeepSpeedSettings:
    stage: int
    bf16_autocast: bool
    gradient_clipping: float
    offload_optimizer: bool = False  # the optimizer state lives in host memory
    reduce_bucket_size: int = 500_000_000  # elements; DeepSpeed's defaults where the JSON is silent
    prefetch_bucket_size: int = 50_000_000  # elements (stage 3)


def read_deepspeed_config(path: Path) -> DeepSpeedSettings:
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError("deepspeed_config_file", f"cannot read {path}: {err}", location=str(path)) from None
    autocast = ds.get("torch_autocast", {})
    if ds.get("bf16", {}).get("enabled") not in (None, False) or ds.get("fp16", {}).get("enabled") not in (None, False):
        raise ConfigError(
            "bf16.enabled",
            "casts the weights but not the BatchNorm buffers, which breaks BatchNorm; "
            'use "torch_autocast": {"enabled": true, "dtype": "bfloat16"} instead',
            location=str(path),
        )
    zero = ds.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none")
    return DeepSpeedSettings(
        stage=int(zero.get("stage", 0)),
        bf16_autocast=bool(autocast.get("enabled")) and autocast.get("dtype", "bfloat16") == "bfloat16",
        gradient_clipping=float(ds.get("gradient_clipping", 0.0)),
        offload_optimizer=offload not in ("none", None),
        reduce_bucket_size=int(zero.get("reduce_bucket_size", DeepSpeedSettings.reduce_bucket_size)),
        prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", DeepSpeedSettings.prefetch_bucket_size)),
    )


def resolve_precision(train: TrainConfig, ds: DeepSpeedSettings | None, ds_path: Path | None) -> str:
    """ "auto": bf16 on CUDA and on a CPU with native bf16, fp32 on other CPUs, or what the DeepSpeed JSON says;
    explicit values must agree with it."""
    if ds is not None:
        json_precision = "bf16" if ds.bf16_autocast else "fp32"
        if train.precision not in ("auto", json_precision):
            raise ConfigError(
                "train.precision",
                f"{train.precision} but {ds_path} sets {json_precision} (torch_autocast); "
                f"make them agree, or set train.precision=auto",
            )
        return json_precision
    if train.precision == "auto":
        # On a CPU with native bf16 the embedded default's step is 1.6x faster in bf16 (channels_last), and
        # with BatchNorm's eps at 1e-3 its shortened recipes no longer collapse in it (README, Measured);
        # elsewhere PyTorch emulates bf16 and it is slower.
        return "bf16" if torch.cuda.is_available() or cpu_has_bf16() else "fp32"
    return train.precision


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles), where bf16 autocast is faster
    than fp32; elsewhere PyTorch emulates it and it is slower."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_channels_last(train: TrainConfig, precision: str, deepspeed: bool = False) -> TrainConfig:
    """`train` with `channels_last: auto` decided: on for bf16 on a CPU, off otherwise and under DeepSpeed,
    which flattens the parameters and needs them contiguous (a channels_last weight stops
    `deepspeed.initialize`). Measured on a 2-core AMX CPU (size n, 256 px, batch 16): bf16 1.27x faster in
    channels_last, fp32 0.90x."""
    if train.channels_last is True and deepspeed:
        raise ConfigError(
            "train.channels_last",
            "true cannot run under DeepSpeed (it flattens the parameters, which must be contiguous); "
            "use false (or auto), or plain DDP",
        )
    if train.channels_last != "auto":
        return train
    on = precision == "bf16" and not torch.cuda.is_available() and not deepspeed
    return dataclasses.replace(train, channels_last=on)


@dataclass(frozen=True)
class LaunchSettings:
    """What the launcher and the DeepSpeed JSON decide, known before any process group exists."""

    world_size: int
    local_world_size: int  # ranks on this machine
    deepspeed: DeepSpeedSettings | None
    precision: str  # "fp32" | "bf16"


def launch_settings(train: TrainConfig) -> LaunchSettings:
    """The run's ranks, DeepSpeed settings and precision; ConfigError if the JSON or precision is wrong."""
    launch = Launch.from_environment()
    ds = read_deepspeed_config(launch.deepspeed_config) if launch.deepspeed_config else None
    precision = resolve_precision(train, ds, launch.deepspeed_config)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", launch.world_size))
    return LaunchSettings(launch.world_size, local, ds, precision)


def build_accelerator(
    train: TrainConfig,
    optim: OptimConfig,
    output_dir: str | Path,
    probe: Callable[[str, torch.device], Callable[[int], None]] | None = None,
) -> tuple[Accelerator, BatchSplit, str, int]:
    """-> (accelerator, batch split, precision "fp32" | "bf16", ZeRO stage or 0 without DeepSpeed).

    `probe(precision, device)` returns a function that runs one training step at a given
    micro-batch. On a GPU it confirms `train.micro_batch` (planned, or "auto": the largest divisor)
    and steps down to the largest that really fits."""
    launch = Launch.from_environment()
    fixed_micro = train.micro_batch if isinstance(train.micro_batch, int) else None
    split = split_global_batch(train.global_batch, launch.world_size, fixed_micro)
    settings = launch_settings(train)
    ds, precision = settings.deepspeed, settings.precision
    if torch.cuda.is_available() and probe is not None:
        # Before the Accelerator exists: its gradient accumulation is fixed at construction.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        candidates = micro_batch_candidates(train.global_batch, launch.world_size)
        micro = largest_fitting([m for m in candidates if m <= split.micro_batch], probe(precision, device))
        split = split_global_batch(train.global_batch, launch.world_size, micro)
    if ds is not None and ds.gradient_clipping != optim.grad_clip:
        raise ConfigError(
            "optim.grad_clip",
            f"{optim.grad_clip} but {launch.deepspeed_config} has gradient_clipping="
            f"{ds.gradient_clipping}; under DeepSpeed the JSON clips, so make them equal",
        )
    return _accelerator(train, split, precision, ds is not None, output_dir), split, precision, ds.stage if ds else 0


def _accelerator(train: TrainConfig, split: BatchSplit, precision: str, deepspeed: bool, output_dir) -> Accelerator:
    # Without CUDA, accelerate picks no backend for DeepSpeed and each rank believes it is alone;
    # gloo makes CPU runs (tests, laptops) real multi-process runs.
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=train.timeout_s))
    if not torch.cuda.is_available() and split.world_size > 1:
        group = InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=train.timeout_s))
    accelerator = Accelerator(
        # Without CUDA, plain DDP must be asked for as CPU training, or each rank trains alone.
        cpu=not torch.cuda.is_available() and not deepspeed,
        gradient_accumulation_steps=split.accumulation,
        # Under DeepSpeed precision belongs to its JSON (torch_autocast); checked above.
        mixed_precision=None if deepspeed else ("bf16" if precision == "bf16" else "no"),
        kwargs_handlers=[group],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,
    )
    if accelerator.num_processes != split.world_size or (
        split.world_size > 1 and accelerator.distributed_type.name == "NO"
    ):
        raise RuntimeError(
            f"the launcher started {split.world_size} processes but accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type.name}): the ranks would not share gradients"
        )
    return accelerator


class InferenceProcesses:
    """Data-parallel prediction over the processes `accelerate launch` started (or this one alone):
    each process predicts its shard, the main one gets everything. No DeepSpeed, no mixed precision.

    Raises ValueError when the launcher started more processes than accelerate runs, as under a
    DeepSpeed accelerate config (each process would evaluate the whole set alone)."""

    def __init__(self, cpu: bool):
        # Without CUDA, plain DDP must be asked for as CPU, or each process would believe it is alone.
        self.accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available())
        launched = Launch.from_environment().world_size
        if self.accelerator.num_processes != launched:
            raise ValueError(
                f"the launcher started {launched} processes but accelerate runs {self.accelerator.num_processes}; "
                "use an accelerate config without DeepSpeed, e.g. ds_configs/accelerate_ddp.yaml"
            )
        self.device = self.accelerator.device
        self.num_processes = self.accelerator.num_processes
        self.is_main_process = self.accelerator.is_main_process

    def main_process_first(self):
        """A context: the main process runs it first (e.g. to generate data), then the others."""
        return self.accelerator.main_process_first()

    def shard(self, loader: DataLoader) -> DataLoader:
        """This process's share of `loader` (the last batches padded with repeats to equal length)."""
        return self.accelerator.prepare(loader)

    def gather(self, items: list) -> list:
        """Every process's list of picklable items, concatenated in rank order, on every process."""
        return gather_object(items)

    def close(self) -> None:
        # Every rank passes its last collective before any tears the process group down: a gloo rank
        # that exits while its peer still holds the group aborts at interpreter exit.
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any rank: how the ranks agree on a stop or a failure. A collective,
    so every rank must call it at the same point."""
    flags = torch.tensor([float(flag)], device=accelerator.device)
    return accelerator.reduce(flags, reduction="sum").item() > 0


def rank_placement(accelerator: Accelerator) -> dict[str, str]:
    """{"rank{r}.host": ..., "rank{r}.local_rank": ..., "rank{r}.device": ...} for every rank (a collective)."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    here = (accelerator.process_index, socket.gethostname(), accelerator.local_process_index, f"{device} ({name})")
    tags = {}
    for rank, host, local, dev in gather_object([here]):
        tags[f"rank{rank}.host"] = host
        tags[f"rank{rank}.local_rank"] = str(local)
        tags[f"rank{rank}.device"] = dev
    return tags
