"""Training on one GPU: a bare process and DeepSpeed ZeRO-2 / ZeRO-3 on one NCCL rank learn and resume;
bf16 autocast; the allocator setting training makes; NVML's per-rank memory in MLflow; the micro-batch
probe stepping down to what fits."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from tests.engine.runs import history, mlflow_run

from .checks import check_bf16_step
from .jobs import EPOCHS, MODES, PROBE_GLOBAL_BATCH, RESUME_STEP, STEPS_PER_EPOCH

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = EPOCHS * STEPS_PER_EPOCH


def _finished(jobs, name: str):
    result = jobs.result(name)
    assert result.returncode == 0, result.output[-4000:]
    return result


@pytest.mark.parametrize("mode", list(MODES))
def test_a_one_gpu_run_learns_and_resumes(jobs, mode):
    whole = _finished(jobs, mode)
    client, run = mlflow_run(whole.out)
    params = run.data.params
    assert params["world_size"] == "1" and params["zero_stage"] == {"plain": "0", "zero2": "2", "zero3": "3"}[mode]
    assert params["precision_resolved"] == "bf16"  # auto on CUDA; under DeepSpeed the JSON's torch_autocast
    assert run.data.tags["distributed_type"] == ("DEEPSPEED" if MODES[mode] else "NO")
    losses = history(client, run, "train/loss_total")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    first, last = (sum(losses[s + 1 + i] for i in range(STEPS_PER_EPOCH)) for s in (0, STEPS - STEPS_PER_EPOCH))
    assert last < 0.8 * first, losses  # the last epoch's loss against the first's
    assert (whole.out / "best.pt").is_file() and (whole.out / "last.pt").is_file()

    resumed = _finished(jobs, f"{mode}-resumed")
    client_b, run_b = mlflow_run(resumed.out)
    after = history(client_b, run_b, "train/loss_total")
    # It continues from the checkpoint's step with the checkpoint's weights, optimizer and data order:
    # the next step's loss is the uninterrupted run's (up to the GPU's non-deterministic reductions).
    assert sorted(after) == list(range(RESUME_STEP + 1, STEPS + 1))
    assert after[RESUME_STEP + 1] == pytest.approx(losses[RESUME_STEP + 1], rel=0.02)
    assert f"resumed from {whole.out / 'checkpoints'}" in resumed.output


def test_the_forward_runs_under_bf16_autocast_on_cuda():
    check_bf16_step(torch.device("cuda"))


def test_training_sets_expandable_segments_and_logs_it(jobs):
    whole = _finished(jobs, "plain")
    assert "CUDA allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by adyolo" in whole.output
    _, run = mlflow_run(whole.out)
    assert run.data.params["cuda_alloc_conf"] == "expandable_segments:True"
    assert run.data.params["cuda_alloc_conf_source"] == "adyolo"
    # And this process (the tests' own measurements) runs with it too: its segments are expandable.
    torch.ones(2**20, device="cuda")
    segments = torch.cuda.memory._snapshot()["segments"]
    assert segments and all(s.get("is_expandable") for s in segments), segments[:2]


def test_nvml_per_rank_memory_is_in_mlflow(jobs):
    whole = _finished(jobs, "plain")
    if not _nvml_sees_this_process():
        pytest.skip("NVML cannot see this machine's processes (a container without the host's PID namespace)")
    client, run = mlflow_run(whole.out)
    nvml = history(client, run, "memory/nvml_process_gib/rank0")
    allocated = history(client, run, "memory/peak_allocated_gib/rank0")
    assert len(nvml) == STEPS and len(allocated) == STEPS
    # NVML counts the whole process on the device: the allocator's share, the CUDA context and more.
    assert all(nvml[step] > allocated[step] > 0 for step in nvml)


def _nvml_sees_this_process() -> bool:
    import os

    pynvml = pytest.importorskip("pynvml")
    torch.ones(1, device="cuda")
    pynvml.nvmlInit()
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    return any(p.pid == os.getpid() for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle))


def test_the_probe_steps_down_to_the_micro_batch_that_fits(jobs):
    """The plan (budget: the whole GPU) takes all 8 images per step; the probe, held to a fraction of the
    GPU below what 8 images' step tensors need, confirms a smaller micro-batch and accumulation makes up
    the global batch."""
    probe = _finished(jobs, "probe")
    _, run = mlflow_run(probe.out)
    params = run.data.params
    assert params["plan.setting"].startswith(f"micro {PROBE_GLOBAL_BATCH} x accum 1")  # what the plan chose
    micro = int(params["micro_batch"])
    assert micro < PROBE_GLOBAL_BATCH and int(params["accumulation"]) * micro == PROBE_GLOBAL_BATCH
    saved = yaml.safe_load((probe.out / "config.yaml").read_text())
    assert saved["train"]["global_batch"] == PROBE_GLOBAL_BATCH
