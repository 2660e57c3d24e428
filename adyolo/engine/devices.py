"""Which device a rank trains on, decided before anything else, and refused where it cannot work.

A node the launcher or the scheduler gives GPUs (Slurm's `SLURM_GPUS_ON_NODE` / `SLURM_JOB_GPUS`,
`CUDA_VISIBLE_DEVICES` naming devices, NVIDIA device files) must train on them: when torch sees no GPU
there (a driver older than the CUDA the wheel is built for, a CPU-only wheel, hidden devices), fewer
GPUs than ranks on the node, or a GPU the wheel has no kernels for, the run stops at start with one
line and what to check, instead of training on the CPU. `CUDA_VISIBLE_DEVICES=""` asks for the CPU on
purpose. `environment_report` is what `launch/doctor.py` prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from adyolo.failures import InputError

DOCTOR = "python launch/doctor.py"


@dataclass(frozen=True)
class LaunchEnvironment:
    """What the launcher (`accelerate launch`, torchrun, DeepSpeed's, Slurm) says about this process."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int  # ranks on this node
    deepspeed_config: Path | None  # the DeepSpeed JSON, when running under DeepSpeed
    gpus_expected: str | None  # why this node should have GPUs (e.g. "SLURM_GPUS_ON_NODE=8"), or None

    @classmethod
    def read(cls, environ: dict[str, str] | None = None) -> LaunchEnvironment:
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        use_ds = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        return cls(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            deepspeed_config=Path(ds_file) if use_ds and ds_file else None,
            gpus_expected=gpus_expected(env),
        )


def gpus_expected(env: dict[str, str]) -> str | None:
    """Why this node should have GPUs, or None. `CUDA_VISIBLE_DEVICES=""` (or -1) means the CPU on purpose,
    as does `DS_ACCELERATOR=cpu` (DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES=0,1,... whatever the device)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    if env.get("DS_ACCELERATOR", "").strip() == "cpu":
        return None
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = env.get(key, "").strip()
        if value and value != "0":
            return f"{key}={value}"
    if visible:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0 exists"
    return None


def check_device(env: LaunchEnvironment) -> str:
    """The device of this rank, "cuda" or "cpu"; raises `InputError` (exit 2) where the GPUs cannot be used."""
    if not torch.cuda.is_available():
        if env.gpus_expected:
            raise InputError(
                f"this node should have GPUs ({env.gpus_expected}) but torch sees none: {cuda_failure()}. "
                f"Check that nvidia-smi works, that the driver supports CUDA "
                f"{torch.version.cuda or '(CPU-only torch)'}, and CUDA_VISIBLE_DEVICES; `{DOCTOR}` prints the "
                'environment. To train on the CPU on purpose, set CUDA_VISIBLE_DEVICES=""'
            )
        return "cpu"
    count = torch.cuda.device_count()
    if count < env.local_world_size:
        raise InputError(
            f"{env.local_world_size} ranks on this node but torch sees {count} GPU{'s' if count != 1 else ''} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): launch at most {count} "
            f"processes per node (accelerate launch --num_processes, or the allocation's GPUs per node)"
        )
    unsupported = unsupported_gpu(env.local_rank)
    if unsupported:
        raise InputError(unsupported)
    return "cuda"


def cuda_failure() -> str:
    """Why CUDA cannot be used, in torch's own words."""
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as err:  # torch's reason: no driver, a driver too old for the wheel's CUDA, ...
        return str(err).strip().splitlines()[0]
    return "torch.cuda.is_available() is false"


def unsupported_gpu(index: int) -> str | None:
    """Why the torch build has no kernels for GPU `index` (e.g. a V100, sm_70, with a wheel built for
    sm_75 and up), or None. A cubin runs on GPUs of its major version and a higher minor; PTX is compiled
    for any newer GPU."""
    major, minor = torch.cuda.get_device_capability(index)
    arches = torch.cuda.get_arch_list()
    for arch in arches:
        kind, _, number = arch.partition("_")
        if not number.isdigit():
            continue
        m, n = int(number[:-1]), int(number[-1])
        if (kind == "sm" and m == major and n <= minor) or (kind == "compute" and (m, n) <= (major, minor)):
            return None
    return (
        f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}) is not supported by this torch build "
        f"(CUDA {torch.version.cuda}, kernels for {', '.join(arches)}): install a torch wheel built for it "
        f"(an older CUDA version); `{DOCTOR}` prints the environment"
    )


def native_bf16(device: str, index: int = 0) -> bool:
    """Whether the device multiplies bf16 natively: CUDA compute capability 8.0+ (not V100 or T4), or a
    CPU with AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower than fp32."""
    if device == "cuda":
        return torch.cuda.get_device_capability(index) >= (8, 0)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def environment_report(env: LaunchEnvironment) -> str:
    """What to paste into a bug report: this process's launch, the device decision, GPUs and memory,
    versions (torch's own `collect_env`), DeepSpeed's op report."""
    lines = [
        f"host {socket.gethostname()}, python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'})",
        f"launch: rank {env.rank} of {env.world_size}, local rank {env.local_rank} of {env.local_world_size} "
        f"on this node; DeepSpeed JSON {env.deepspeed_config or '-'}; GPUs expected: {env.gpus_expected or 'no'}",
    ]
    try:
        lines.append(f"device: {check_device(env)} (a run would start)")
    except InputError as err:
        lines.append(f"device: REFUSED: {err}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(
                f"gpu {i}: {torch.cuda.get_device_name(i)}, sm_{major}{minor}, {free / 2**30:.1f} of "
                f"{total / 2**30:.1f} GiB free, native bf16: {native_bf16('cuda', i)}"
            )
    else:
        lines.append(f"cpu: native bf16: {native_bf16('cpu')}; CUDA: {cuda_failure()}")
    from torch.utils.collect_env import get_pretty_env_info

    lines += ["", "torch.utils.collect_env:", get_pretty_env_info(), "", "DeepSpeed ops (ds_report):", _deepspeed_ops()]
    return "\n".join(lines)


def _deepspeed_ops() -> str:
    try:
        from deepspeed.env_report import op_report
    except Exception as err:  # a missing or broken DeepSpeed is itself the finding
        return f"deepspeed does not import: {type(err).__name__}: {err}"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        op_report(verbose=False)
    return buffer.getvalue().rstrip()
