"""A run's launch, resolved before any training: the device (a GPU node whose GPUs torch cannot use is
refused, not trained on its CPU), precision by what the device multiplies natively, the DeepSpeed JSON
(no silent optimizer swap), the micro-batch probe (every allocation failure steps down; ranks agree),
the per-node image cache, the process count of the accelerate configs and the Slurm script's CPUs.
What only a GPU can answer (`torch.cuda`'s) is mocked here."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adyolo.config import load_run_config
from adyolo.data.dataset import check_cache_fits
from adyolo.engine import devices
from adyolo.engine.accelerator import (
    DeepSpeedSettings,
    LaunchSettings,
    read_deepspeed_config,
    resolve_channels_last,
    resolve_launch,
    resolve_precision,
)
from adyolo.engine.autobatch import largest_fitting
from adyolo.engine.config import TrainConfig
from adyolo.engine.devices import LaunchEnvironment, check_device, gpus_expected
from adyolo.failures import InputError
from adyolo.launcher import with_process_count
from adyolo.model import build_model
from adyolo.schema import ConfigError

from .runs import ROOT, TRAIN, environment

DS = ROOT / "ds_configs"


def env(**values) -> LaunchEnvironment:
    return LaunchEnvironment.read({"WORLD_SIZE": "1", **values})


class FakeGPU:
    """torch.cuda as a machine with `count` GPUs of compute capability `capability` answers."""

    def __init__(self, monkeypatch, count=1, capability=(9, 0), name="NVIDIA H100", arches=("sm_75", "sm_80", "sm_90")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arches))


# --------------------------------------------------------------------------------------------------
# The device: a GPU node never trains on its CPU by accident.


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),
        ({"SLURM_JOB_GPUS": "0,1"}, "SLURM_JOB_GPUS=0,1"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "CUDA_VISIBLE_DEVICES=0,1,2,3"),
        ({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "8"}, None),  # the CPU asked for on purpose
        ({"SLURM_GPUS_ON_NODE": "0"}, None),
        ({"CUDA_VISIBLE_DEVICES": "0,1", "DS_ACCELERATOR": "cpu"}, None),  # `deepspeed --num_gpus 2` on a CPU
    ],
)
def test_what_says_a_node_has_gpus(monkeypatch, variables, expected):
    monkeypatch.setattr(devices.Path, "exists", lambda self: False)  # no /dev/nvidia0 here either way
    assert gpus_expected(variables) == expected


def test_a_gpu_node_whose_gpus_torch_cannot_see_is_refused(monkeypatch):
    FakeGPU(monkeypatch, count=0)
    monkeypatch.setattr(devices, "cuda_failure", lambda: "The NVIDIA driver on your system is too old")
    with pytest.raises(InputError, match=r"should have GPUs \(SLURM_GPUS_ON_NODE=8\) but torch sees none: The NVIDIA"):
        check_device(env(SLURM_GPUS_ON_NODE="8"))
    assert check_device(env(CUDA_VISIBLE_DEVICES="")) == "cpu"


def test_fewer_gpus_than_ranks_or_a_gpu_without_kernels_is_refused(monkeypatch):
    FakeGPU(monkeypatch, count=4)
    assert check_device(env(WORLD_SIZE="8", LOCAL_WORLD_SIZE="4", LOCAL_RANK="3")) == "cuda"
    with pytest.raises(InputError, match="8 ranks on this node but torch sees 4 GPUs"):
        check_device(env(WORLD_SIZE="8", LOCAL_WORLD_SIZE="8"))
    # A V100 (sm_70) with a wheel built for sm_75 and up has no kernels; a T4 (sm_75) and an L4 (sm_89,
    # running sm_80 kernels) have.
    FakeGPU(monkeypatch, capability=(7, 0), name="Tesla V100-SXM2-32GB")
    with pytest.raises(InputError, match=r"Tesla V100-SXM2-32GB \(sm_70\) is not supported by this torch build"):
        check_device(env())
    for capability in ((7, 5), (8, 9)):
        FakeGPU(monkeypatch, capability=capability)
        assert check_device(env()) == "cuda"
    FakeGPU(monkeypatch, capability=(12, 0), arches=("sm_90", "compute_90"))  # PTX compiles for newer GPUs
    assert check_device(env()) == "cuda"


def test_a_gpu_job_without_visible_gpus_stops_at_start_instead_of_training_on_the_cpu(tmp_path):
    """The process as Slurm starts it on a GPU node whose driver torch cannot use: exit 2 in seconds,
    nothing written."""
    variables = {k: v for k, v in environment().items() if k != "CUDA_VISIBLE_DEVICES"}
    variables["SLURM_GPUS_ON_NODE"] = "8"
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(TRAIN), f"output_dir={out}", f"data.synthetic_root={tmp_path / 'syn'}"],
        capture_output=True, text=True, env=variables, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: this node should have GPUs (SLURM_GPUS_ON_NODE=8) but torch sees none" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


# --------------------------------------------------------------------------------------------------
# Precision: bf16 only where the device multiplies it natively.


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_and_memory_format_on_cpu(monkeypatch, native):
    monkeypatch.setattr("adyolo.engine.accelerator.native_bf16", lambda device, index=0: native)
    precision, why = resolve_precision(TrainConfig(), None, "cpu")
    assert (precision, why) == (
        ("bf16", "auto: this CPU has native bf16") if native else ("fp32", "auto: this CPU has no native bf16")
    )
    assert resolve_channels_last(TrainConfig(), precision, "cpu", deepspeed=False) is native
    assert resolve_precision(TrainConfig(precision="fp32"), None, "cpu") == ("fp32", "train.precision")
    # DeepSpeed flattens the parameters: auto is off under it, and true is refused before any work.
    assert resolve_channels_last(TrainConfig(), "bf16", "cpu", deepspeed=True) is False
    with pytest.raises(ConfigError, match="train.channels_last: true cannot run under DeepSpeed"):
        resolve_channels_last(TrainConfig(channels_last=True), "bf16", "cpu", deepspeed=True)


def test_gpus_without_native_bf16_train_in_fp32(monkeypatch):
    """V100 and T4 (compute capability 7.x) emulate bf16: auto is fp32 there, also under a DeepSpeed JSON
    that asks for bf16 autocast; bf16 asked for explicitly is refused. An A100 / H100 trains in bf16."""
    ds = DeepSpeedSettings(stage=2, bf16_autocast=True, gradient_clipping=10.0)
    FakeGPU(monkeypatch, capability=(7, 5), name="Tesla T4")
    assert resolve_precision(TrainConfig(), None, "cuda") == ("fp32", "auto: Tesla T4 has no native bf16")
    assert resolve_precision(TrainConfig(), ds, "cuda")[0] == "fp32"
    with pytest.raises(ConfigError, match="train.precision: bf16, but Tesla T4 has no native bf16"):
        resolve_precision(TrainConfig(precision="bf16"), None, "cuda")
    FakeGPU(monkeypatch, capability=(8, 0), name="NVIDIA A100")
    assert resolve_precision(TrainConfig(), None, "cuda") == ("bf16", "auto: NVIDIA A100 has native bf16")
    assert resolve_precision(TrainConfig(), ds, "cuda") == ("bf16", "the DeepSpeed JSON")
    # An explicit precision is the run's, also under DeepSpeed (its torch_autocast follows it).
    assert resolve_precision(TrainConfig(precision="fp32"), ds, "cuda") == ("fp32", "train.precision")


# --------------------------------------------------------------------------------------------------
# The DeepSpeed JSONs: no silent optimizer swap.


def test_offloading_the_optimizer_keeps_the_configured_one(tmp_path):
    """Accelerate replaces the optimizer by DeepSpeedCPUAdam under optimizer offload unless the JSON says
    `zero_force_ds_cpu_optimizer: false`: the shipped JSON does, and a JSON without it is refused."""
    assert read_deepspeed_config(DS / "zero2_offload.json").offload_optimizer
    ds = json.loads((DS / "zero2_offload.json").read_text())
    del ds["zero_force_ds_cpu_optimizer"]
    path = tmp_path / "offload.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="zero_force_ds_cpu_optimizer: is not false with offload_optimizer"):
        read_deepspeed_config(path)
    for name in ("zero1", "zero2", "zero3"):
        assert read_deepspeed_config(DS / f"{name}.json").stage == int(name[-1])


def test_accelerate_configs_ask_for_the_process_count(monkeypatch):
    """The configs set no process count (accelerate then asks for --num_processes instead of starting 2
    on an 8-GPU machine); launch/launch.py fills in one per GPU."""
    for path in DS.glob("accelerate_*.yaml"):
        text = path.read_text()
        assert yaml.safe_load(text)["num_processes"] == -1, path
        assert "every GPU" not in text
    argv = ["--config_file", "ds_configs/accelerate_zero2.yaml", "launch/train.py"]
    assert with_process_count(argv, 8) == ["--num_processes", "8", *argv]
    assert with_process_count(["--num_processes", "2", *argv], 8) == ["--num_processes", "2", *argv]
    assert with_process_count(argv, 0) == argv


# --------------------------------------------------------------------------------------------------
# The micro-batch probe.


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 23.93 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN Frontend error: No execution plans support the graph. unable to find an engine"),
    ],
)  # fmt: skip
def test_the_probe_steps_down_on_every_kind_of_allocation_failure(error):
    def fits(micro):
        if micro > 5:
            raise error

    assert largest_fitting([20, 10, 7, 5, 4], fits) == 5
    with pytest.raises(RuntimeError, match="illegal memory access"):  # anything else is not "too big"
        largest_fitting([20, 10], lambda m: (_ for _ in ()).throw(RuntimeError("an illegal memory access")))


@pytest.mark.distributed
def test_ranks_agree_on_the_probed_micro_batch(tmp_path):
    """Two gloo ranks whose probes answer differently (rank 1 fits less) both train the smaller
    micro-batch, with the same accumulation."""
    script = ROOT / "tests" / "engine" / "agree_probe.py"
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
        str(DS / "accelerate_ddp.yaml"), "--num_processes", "2", "--main_process_port", "0", str(script), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert answers[0] == answers[1] == {"micro_batch": 4, "accumulation": 3, "accelerator_accumulation": 3}


# --------------------------------------------------------------------------------------------------
# Memory and CPUs per node, host reads per step.


def test_the_image_cache_counts_every_rank_of_the_node(monkeypatch):
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("M", (), {"available": 10 * 2**30})())
    check_cache_fits(10_000, 256, copies=1)  # 1.8 GiB
    with pytest.raises(InputError, match=r"14.6 GiB of RAM \(8 ranks on this machine, a copy each\)"):
        check_cache_fits(10_000, 256, copies=8)


def test_a_step_reads_the_device_once_per_micro_batch(monkeypatch):
    """Every host read of a device value makes a GPU step wait: one per micro-batch (the ranks' agreement
    that the loss is finite) and one per step (the gradient norm), none for logging or memory."""
    from adyolo.config import RunConfig
    from adyolo.data.batch import synthetic_batch
    from adyolo.engine.setup import bare_step
    from adyolo.model import ModelConfig

    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(size="n", fusion="efficient", img_size=64))
    step = bare_step(cfg.model, cfg.loss, cfg.optim, cfg.train, torch.device("cpu"))
    step([synthetic_batch(2, 64)], step=0)  # the first call builds what is kept between steps
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    window = step([synthetic_batch(2, 64)], step=1)
    monkeypatch.undo()
    assert window.stepped and sorted(reads) == ["__bool__", "item"], reads


def test_the_slurm_script_gives_each_node_the_jobs_cpus(tmp_path):
    """`srun` gets --cpus-per-task (job steps of Slurm 22.05-23.02 do not inherit it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'case "$2" in hostnames) echo n1;; node) echo "NodeName=n1 NodeAddr=10.0.0.1";; esac\n',
        "srun": f'echo "$@" > {tmp_path}/srun.args\n',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    variables = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "adyolo", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1",
        "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64", "OUTPUT_DIR": str(tmp_path / "run"),
    }  # fmt: skip
    result = subprocess.run(["bash", "slurm/train.sh"], capture_output=True, text=True, env=variables, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "srun.args").read_text()
    assert "--cpus-per-task=64" in args and "--ntasks-per-node=1" in args


# --------------------------------------------------------------------------------------------------
# The documented cluster commands pass the start checks on any number of GPUs.


@pytest.mark.parametrize("ranks", [3, 6, 12, 16, 24, 32])
def test_the_paper_config_splits_over_any_gpu_count(ranks):
    cfg = load_run_config(ROOT / "launch" / "configs" / "widerface_s.yaml")
    settings = LaunchSettings(ranks, 8, read_deepspeed_config(DS / "zero2.json"), "bf16", "cuda")
    split = resolve_launch(settings, cfg.train).split
    assert sum(split.rank_images(r) for r in range(ranks)) == cfg.train.global_batch == 40
    assert max(split.micro_sizes(0)) - min(split.micro_sizes(ranks - 1)) <= 1


def test_the_environment_report_names_the_refusal(monkeypatch):
    """What launch/doctor.py prints: the launch, the device decision (here: refused), torch's own report."""
    FakeGPU(monkeypatch, count=0)
    monkeypatch.setattr(devices, "cuda_failure", lambda: "Found no NVIDIA driver on your system")
    report = devices.environment_report(env(SLURM_GPUS_ON_NODE="4", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4"))
    assert "launch: rank 0 of 8, local rank 0 of 4 on this node" in report
    assert "device: REFUSED: this node should have GPUs (SLURM_GPUS_ON_NODE=4)" in report
    assert "PyTorch version" in report and "DeepSpeed" in report


def test_the_start_line_run_name_and_params_say_an_uneven_split():
    from adyolo.run import run_name

    cfg = load_run_config(ROOT / "launch" / "configs" / "widerface_s.yaml")
    settings = LaunchSettings(16, 8, read_deepspeed_config(DS / "zero2.json"), "bf16", "cuda", "the DeepSpeed JSON")
    launch = resolve_launch(settings, cfg.train)
    assert run_name(cfg, launch) == "full-sdpa-s-640px-16gpu-40=8x3+8x2-zero2"
    split = "global batch 40 = 8 ranks x 3 + 8 ranks x 2 images (micro-batch 3 / 2, 1 accumulation step)"
    assert launch.params()["batch_split"] == split
    assert launch.text() == f"{split}; bf16 autocast (the DeepSpeed JSON); DeepSpeed ZeRO-2 over 16 processes (cuda)"


@pytest.mark.parametrize(("img_size", "refused"), [(64, True), (96, False), (640, False)])
def test_a_micro_batch_of_one_image_is_refused_where_the_smallest_map_is_1x1(img_size, refused):
    """40 images over 32 ranks leave 24 ranks one image each: trainable at 96 px and up; at 64 px High-GD's
    map of one image is 1x1, where train-mode BatchNorm fails (found before anything starts)."""
    from adyolo.run import check_single_image_steps

    cfg = load_run_config(ROOT / "launch" / "configs" / "widerface_s.yaml", [f"model.img_size={img_size}"])
    settings = LaunchSettings(32, 8, read_deepspeed_config(DS / "zero2.json"), "bf16", "cuda")
    launch = resolve_launch(settings, cfg.train)
    assert launch.split.smallest_micro_batch == 1
    if not refused:
        check_single_image_steps(cfg, launch)
        return
    with pytest.raises(InputError, match=r"micro-batches of one image, .* use model.img_size >= 96"):
        check_single_image_steps(cfg, launch)
    model = build_model(cfg.model).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.zeros(1, 3, img_size, img_size))
