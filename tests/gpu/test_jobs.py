"""On any machine: what the gpu-marked tests start and run is checked here, so a renamed config key,
launcher file or flag fails the CPU suite instead of the first GPU session; `pytest -m gpu` collects
them and, without CUDA, skips every one cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from adyolo.config import RunConfig, load_run_config
from adyolo.engine.cuda_allocator import ENV, NEWER_ENV
from adyolo.plan.cost import cache_key

from .checks import check_bf16_step
from .jobs import (
    EPOCHS,
    MEMORY_VARIANTS,
    MODES,
    PROBE_GLOBAL_BATCH,
    RESUME_STEP,
    config_of,
    gpu_environment,
    memory_model,
    overrides_of,
    plan_cache_in,
    probe_command,
    resume_command,
    traced_configs,
    whole_command,
)

ROOT = Path(__file__).parents[2]


def _launcher_of(command: list[str]) -> Path | None:
    return Path(command[command.index("--config_file") + 1]) if "--config_file" in command else None


def test_the_gpu_runs_commands_are_valid(tmp_path):
    synthetic = tmp_path / "syn"
    for mode, launcher in MODES.items():
        whole = whole_command(mode, tmp_path / mode, synthetic)
        resumed = resume_command(mode, tmp_path / mode, tmp_path / f"{mode}-resumed", synthetic)
        for command in (whole, resumed):
            cfg = load_run_config(config_of(command), overrides_of(command))  # every key exists
            assert cfg.epochs == EPOCHS and cfg.train.save_interval == RESUME_STEP and cfg.train.precision == "auto"
            assert cfg.optim.lr == 0.005 and cfg.train.eval_interval == EPOCHS
            assert str(ROOT / "launch" / "train.py") in command
            if launcher is None:
                assert command[0] == sys.executable and _launcher_of(command) is None
            else:
                assert _launcher_of(command) == ROOT / "ds_configs" / f"accelerate_{launcher}.yaml"
                assert _launcher_of(command).is_file() and command[command.index("--num_processes") + 1] == "1"
        assert resumed[-2:] == ["--resume", str(tmp_path / mode / "checkpoints" / f"step-{RESUME_STEP:08d}")]

    probe = probe_command(tmp_path / "probe", synthetic, budget_gib=80.0, fraction=0.004)
    cfg = load_run_config(config_of(probe), overrides_of(probe))
    assert cfg.train.micro_batch == "auto" and cfg.train.global_batch == PROBE_GLOBAL_BATCH
    assert cfg.train.memory_budget_gib == 80.0 and cfg.train.auto_batch_memory_fraction == 0.004


def test_the_background_traces_are_the_ones_the_tests_and_the_probe_run_read():
    """A trace the session fills must be the one read later (the cache is keyed by the configuration):
    the memory tests plan `RunConfig(model=...)`, the probe's run plans its own config."""
    key = lambda cfg: cache_key(cfg.model, cfg.loss, cfg.optim, cfg.train, "bf16", "cuda")  # noqa: E731
    traced = {name: key(cfg) for name, cfg in traced_configs().items()}
    assert {v: key(RunConfig(model=memory_model(v))) for v in MEMORY_VARIANTS} == {
        v: traced[v] for v in MEMORY_VARIANTS
    }
    probe_run = probe_command(Path("probe"), Path("syn"), budget_gib=80.0, fraction=0.004)
    assert key(load_run_config(config_of(probe_run), overrides_of(probe_run))) == traced["probe"]
    assert len(set(traced.values())) == len(traced)


def test_gpu_runs_see_the_gpus_and_set_the_allocator_themselves(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # as the CPU tests' helper sets it
    monkeypatch.setenv(ENV, "expandable_segments:False")
    monkeypatch.setenv(NEWER_ENV, "backend:native")
    env = gpu_environment(tmp_path)
    assert "CUDA_VISIBLE_DEVICES" not in env and ENV not in env and NEWER_ENV not in env
    assert env["XDG_CACHE_HOME"] == str(tmp_path) and plan_cache_in(tmp_path) == tmp_path / "adyolo" / "plan"


def test_the_bf16_step_check_on_the_cpu():
    """The body of the GPU's bf16 autocast test, on this device."""
    check_bf16_step(torch.device("cpu"))


def test_pytest_m_gpu_collects_the_gpu_tests_and_skips_them_without_cuda():
    """As the GPU acceptance script runs them (no xdist, no cache); with CUDA here, collected only."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:xdist", "-p", "no:cacheprovider"]
    command += ["-o", "addopts=-ra", "-q", "tests", *(["--collect-only"] if torch.cuda.is_available() else [])]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    counted = re.search(r"(\d+) (skipped|tests collected)", summary)
    assert counted and int(counted.group(1)) >= 8 and "error" not in summary, summary
    if not torch.cuda.is_available():
        assert "passed" not in summary and "failed" not in summary and "needs a CUDA device" in proc.stdout
