"""A run's launch, resolved in one place: the device (refused where the node's GPUs cannot be used), the
DeepSpeed JSON, precision, memory format, the batch split over the ranks (the micro-batch probe's
answer agreed by every rank), and the Accelerator built from it. Everything but the probe is checked
before a process group exists."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from adyolo.engine.batching import BatchSplit, split_global_batch
from adyolo.engine.config import OptimConfig, TrainConfig
from adyolo.engine.devices import LaunchEnvironment, check_device, native_bf16
from adyolo.schema import ConfigError

# The DeepSpeed JSONs and accelerate configs that ship with the project (one per ZeRO stage).
DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


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
    offload_optimizer = offload not in ("none", None)
    if offload_optimizer and ds.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise ConfigError(
            "zero_force_ds_cpu_optimizer",
            "is not false with offload_optimizer: Accelerate would then replace the configured SGD / AdamW by "
            'DeepSpeedCPUAdam (Adam with L2 decay) at the same learning rate; add "zero_force_ds_cpu_optimizer": '
            "false (as ds_configs/zero2_offload.json has)",
            location=str(path),
        )
    return DeepSpeedSettings(
        stage=int(zero.get("stage", 0)),
        bf16_autocast=bool(autocast.get("enabled")) and autocast.get("dtype", "bfloat16") == "bfloat16",
        gradient_clipping=float(ds.get("gradient_clipping", 0.0)),
        offload_optimizer=offload_optimizer,
        reduce_bucket_size=int(zero.get("reduce_bucket_size", DeepSpeedSettings.reduce_bucket_size)),
        prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", DeepSpeedSettings.prefetch_bucket_size)),
    )


def resolve_precision(
    train: TrainConfig, ds: DeepSpeedSettings | None, device: str, local_rank: int = 0
) -> tuple[str, str]:
    """-> (precision "bf16" | "fp32", why, in words). An explicit `train.precision` is the run's (under
    DeepSpeed it sets the JSON's torch_autocast for this run). "auto": bf16 on a device with native bf16
    (CUDA compute capability 8.0+, a CPU with AVX512-BF16 or AMX), fp32 where bf16 would be emulated
    (V100, T4, older CPUs); under DeepSpeed the JSON's, except bf16 on a GPU without native bf16, which
    becomes fp32. Explicit bf16 on a GPU without native bf16 is refused."""
    native = native_bf16(device, local_rank)
    where = torch.cuda.get_device_name(local_rank) if device == "cuda" else "this CPU"
    if train.precision == "bf16":
        if device == "cuda" and not native:
            raise ConfigError(
                "train.precision",
                f"bf16, but {where} has no native bf16 (compute capability below 8.0): it would be emulated, "
                "slower than fp32; use fp32 (or auto)",
            )
        return "bf16", "train.precision"
    if train.precision == "fp32":
        return "fp32", "train.precision"
    if ds is not None:
        if ds.bf16_autocast and device == "cuda" and not native:
            return "fp32", f"auto: {where} has no native bf16; the JSON's torch_autocast is off for this run"
        # On a CPU the JSON decides, as without a GPU it always has: emulated bf16 is slower, not wrong.
        return ("bf16", "the DeepSpeed JSON") if ds.bf16_autocast else ("fp32", "the DeepSpeed JSON")
    return ("bf16", f"auto: {where} has native bf16") if native else ("fp32", f"auto: {where} has no native bf16")


def resolve_channels_last(train: TrainConfig, precision: str, device: str, deepspeed: bool) -> bool:
    """`channels_last: auto` decided: on for bf16 on a CPU (oneDNN's bf16 convolutions are fastest in it),
    off otherwise and under DeepSpeed, which flattens the parameters and needs them contiguous (a
    channels_last weight stops `deepspeed.initialize`)."""
    if train.channels_last is True and deepspeed:
        raise ConfigError(
            "train.channels_last",
            "true cannot run under DeepSpeed (it flattens the parameters, which must be contiguous); "
            "use false (or auto), or plain DDP",
        )
    if train.channels_last != "auto":
        return train.channels_last
    return precision == "bf16" and device == "cpu" and not deepspeed


@dataclass(frozen=True)
class LaunchSettings:
    """What the launcher, the devices and the DeepSpeed JSON decide, before any process group exists."""

    world_size: int
    local_world_size: int  # ranks on this machine
    deepspeed: DeepSpeedSettings | None
    precision: str  # "fp32" | "bf16"
    device: str = "cpu"  # "cuda" | "cpu"
    precision_reason: str = ""  # why, in words
    deepspeed_config: Path | None = None
    local_rank: int = 0

    @property
    def zero_stage(self) -> int:
        return self.deepspeed.stage if self.deepspeed is not None else 0


def launch_settings(train: TrainConfig, optim: OptimConfig | None = None) -> LaunchSettings:
    """The run's ranks, device, DeepSpeed settings and precision. Raises `InputError` where the node's GPUs
    cannot be used, `ConfigError` when the JSON, the precision or the clipping is wrong."""
    env = LaunchEnvironment.read()
    device = check_device(env)
    if device == "cpu":
        # Tells DeepSpeed the accelerator, so it does not probe and warn on every process.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds = read_deepspeed_config(env.deepspeed_config) if env.deepspeed_config else None
    if ds is not None and optim is not None and ds.gradient_clipping != optim.grad_clip:
        raise ConfigError(
            "optim.grad_clip",
            f"{optim.grad_clip} but {env.deepspeed_config} has gradient_clipping="
            f"{ds.gradient_clipping}; under DeepSpeed the JSON clips, so make them equal",
        )
    precision, why = resolve_precision(train, ds, device, env.local_rank)
    return LaunchSettings(
        env.world_size, env.local_world_size, ds, precision, device, why, env.deepspeed_config, env.local_rank
    )


@dataclass(frozen=True)
class Launch:
    """A resolved launch: the settings, the batch split and the memory format, the same on every rank."""

    settings: LaunchSettings
    split: BatchSplit
    channels_last: bool

    @property
    def zero_stage(self) -> int:
        return self.settings.zero_stage

    @property
    def precision(self) -> str:
        return self.settings.precision

    def distribution(self) -> str:
        """How the ranks share the work: "one process (cpu)", "DDP over 8 processes (cuda)", ..."""
        n, device = self.split.world_size, self.settings.device
        if self.zero_stage:
            offload = ", optimizer offloaded to host memory" if self.settings.deepspeed.offload_optimizer else ""
            return f"DeepSpeed ZeRO-{self.zero_stage} over {n} processes ({device}{offload})"
        return f"DDP over {n} processes ({device})" if n > 1 else f"one process ({device})"

    def text(self) -> str:
        """The start line: split, precision (and why), memory format, distribution."""
        how = "bf16 autocast" if self.precision == "bf16" else "fp32"
        return (
            f"{self.split}; {how} ({self.settings.precision_reason}){', channels_last' if self.channels_last else ''}; "
            f"{self.distribution()}"
        )

    def params(self) -> dict[str, object]:
        """For MLflow and run.json: what this launch resolved."""
        return {
            "world_size": self.split.world_size,
            "zero_stage": self.zero_stage,
            "device": self.settings.device,
            "micro_batch": self.split.micro_batch,
            "accumulation": self.split.accumulation,
            "batch_split": str(self.split),
            "precision_resolved": self.precision,
            "precision_reason": self.settings.precision_reason,
        }


def resolve_launch(settings: LaunchSettings, train: TrainConfig) -> Launch:
    """The launch of a run whose `train.micro_batch` is decided (a number or None): its split and memory
    format. Raises `BatchSplitError` when the ranks cannot split the global batch."""
    micro = train.micro_batch if isinstance(train.micro_batch, int) else None
    split = split_global_batch(train.global_batch, settings.world_size, micro)
    channels_last = resolve_channels_last(train, settings.precision, settings.device, settings.deepspeed is not None)
    return Launch(settings, split, channels_last)


def build_accelerator(launch: Launch, timeout_s: int, output_dir: str | Path) -> Accelerator:
    """The Accelerator of a resolved launch: the process group (gloo without CUDA), the split's gradient
    accumulation, the precision (under DeepSpeed written into its JSON's torch_autocast)."""
    settings, split = launch.settings, launch.split
    deepspeed = settings.deepspeed is not None
    # Without CUDA, accelerate picks no backend for DeepSpeed and each rank believes it is alone;
    # gloo makes CPU runs (tests, laptops) real multi-process runs.
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    if settings.device == "cpu" and split.world_size > 1:
        group = InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=timeout_s))
    accelerator = Accelerator(
        # Without CUDA, plain DDP must be asked for as CPU training, or each rank trains alone.
        cpu=settings.device == "cpu" and not deepspeed,
        gradient_accumulation_steps=split.accumulation,
        # Under DeepSpeed precision belongs to its JSON (torch_autocast), set below.
        mixed_precision=None if deepspeed else ("bf16" if launch.precision == "bf16" else "no"),
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
    if deepspeed:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["torch_autocast"] = {**config.get("torch_autocast", {}), "enabled": launch.precision == "bf16"}
        if launch.precision == "bf16":
            config["torch_autocast"].setdefault("dtype", "bfloat16")
        # The largest micro-batch of any rank (uneven splits differ by one image): DeepSpeed only checks
        # micro x accumulation x ranks against train_batch_size, which Accelerate fills in from these.
        config["train_micro_batch_size_per_gpu"] = split.micro_batch
    return accelerator


def start_launch(train: TrainConfig, optim: OptimConfig, output_dir: str | Path) -> tuple[Launch, Accelerator]:
    """The launch of `train` as it stands (no memory plan, no probe) and its Accelerator: what the
    benchmark and the plan's measurement run under."""
    launch = resolve_launch(launch_settings(train, optim), train)
    return launch, build_accelerator(launch, train.timeout_s, output_dir)


class InferenceProcesses:
    """Data-parallel prediction over the processes `accelerate launch` started (or this one alone):
    each process predicts its shard, the main one gets everything. No DeepSpeed, no mixed precision.

    Raises ValueError when the launcher started more processes than accelerate runs, as under a
    DeepSpeed accelerate config (each process would evaluate the whole set alone)."""

    def __init__(self, cpu: bool):
        # Without CUDA, plain DDP must be asked for as CPU, or each process would believe it is alone.
        self.accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available())
        launched = LaunchEnvironment.read().world_size
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
