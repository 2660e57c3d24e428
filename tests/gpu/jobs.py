"""The work the gpu-marked tests start, built so that the CPU suite can check it (`test_jobs.py`):
training runs on one GPU (plain, DeepSpeed ZeRO-2 and ZeRO-3 on one NCCL rank) and their resumption,
the micro-batch probe's run, and the traces the memory tests plan with. On a GPU machine they run
side by side (`Jobs`), so the gpu-marked tests finish in a couple of minutes."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from adyolo.config import RunConfig, load_run_config
from adyolo.data.synthetic import ensure_synthetic_dataset
from adyolo.engine.cuda_allocator import ENV, NEWER_ENV
from adyolo.model import ModelConfig
from adyolo.plan.cost import step_memory
from tests.engine.runs import LEARNABLE, ROOT, TINY, train_command

# One GPU, three ways: a bare process, and DeepSpeed ZeRO-2 / ZeRO-3 on one rank (NCCL).
MODES = {"plain": None, "zero2": "zero2", "zero3": "zero3"}
# 16 images at global batch 4: 4 steps an epoch; 12 epochs at lr 0.005 learn (the first epoch's mean loss
# falls by a third on the CPU; tests/launch's trained detector is the same recipe), evaluated once at the
# end; a checkpoint at step 3 to resume from (mid epoch 1).
EPOCHS, STEPS_PER_EPOCH = 12, 4
WHOLE = [
    *LEARNABLE,
    f"epochs={EPOCHS}",
    "optim.lr=0.005",
    f"train.eval_interval={EPOCHS}",
    "train.save_interval=3",
    "train.keep_checkpoints=100",
    "train.precision=auto",
]
RESUME_STEP = 3
# The probe's run: a global batch of 8 images at 320 px, every candidate planned to fit the GPU.
PROBE = ["model.img_size=320", "train.global_batch=8", "epochs=1", "train.precision=auto"]
PROBE_GLOBAL_BATCH = 8
# The memory tests' model: docs/memory-plan.md's GPU table's (size s, 640 px, bf16), at 8 images.
MEMORY_BATCH = 8
MEMORY_VARIANTS = {
    "full/sdpa": {"fusion": "full", "attention": "sdpa"},
    "full/explicit": {"fusion": "full", "attention": "explicit"},
    "efficient": {"fusion": "efficient"},
    "yolov5face": {"neck": "yolov5face"},
}


def memory_model(variant: str) -> ModelConfig:
    return ModelConfig(size="s", img_size=640, **MEMORY_VARIANTS[variant])


def plan_cache_in(xdg_cache: Path) -> Path:
    """Where a process with XDG_CACHE_HOME=`xdg_cache` caches its plans (`default_cache_dir`)."""
    return xdg_cache / "adyolo" / "plan"


def gpu_environment(xdg_cache: Path) -> dict[str, str]:
    """A GPU run's environment: the GPUs visible (the CPU tests' helper hides them), the allocator left
    for the run to set (what it does by default), MLflow in the run folder, plans cached per session."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(xdg_cache))
    if env.get("CUDA_VISIBLE_DEVICES") == "":
        env.pop("CUDA_VISIBLE_DEVICES")
    for name in (ENV, NEWER_ENV, "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def whole_command(mode: str, out: Path, synthetic: Path) -> list[str]:
    return train_command(out, synthetic, *WHOLE, launcher=MODES[mode], processes=1)


def resume_command(mode: str, whole: Path, out: Path, synthetic: Path) -> list[str]:
    checkpoint = whole / "checkpoints" / f"step-{RESUME_STEP:08d}"
    return train_command(out, synthetic, *WHOLE, launcher=MODES[mode], processes=1) + ["--resume", str(checkpoint)]


def probe_command(out: Path, synthetic: Path, budget_gib: float, fraction: float) -> list[str]:
    """`train.micro_batch=auto` planned against `budget_gib`, the probe confirming it within `fraction`
    of the GPU."""
    overrides = [
        *PROBE,
        "train.micro_batch=auto",
        f"train.memory_budget_gib={budget_gib:.3f}",
        f"train.auto_batch_memory_fraction={fraction:.6f}",
    ]
    return train_command(out, synthetic, *overrides)


def overrides_of(command: list[str]) -> list[str]:
    """The key=value overrides a train.py command passes (what load_run_config takes)."""
    return [arg for arg in command if "=" in arg and not arg.startswith("-")]


def config_of(command: list[str]) -> Path:
    return Path(command[command.index("--config") + 1]) if "--config" in command else TINY


@dataclass
class Finished:
    """What a job left: its folder, exit code and output."""

    out: Path
    returncode: int
    output: str


def run_job(command: list[str], out: Path, env: dict[str, str], timeout: float = 600) -> Finished:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return Finished(out, proc.returncode, proc.stdout + proc.stderr)


def traced_configs() -> dict[str, RunConfig]:
    """What the session traces in the background: the configurations the memory tests plan
    (`RunConfig(model=...)`) and the one the probe's run plans (its own config)."""
    return {
        **{variant: RunConfig(model=memory_model(variant)) for variant in MEMORY_VARIANTS},
        "probe": load_run_config(TINY, PROBE),
    }


def trace_job(cfg: RunConfig, precision: str, cache: Path) -> None:
    """Fill the plan cache for one configuration (as the GPU planner asks: CUDA autocast's policy)."""
    step_memory(cfg.model, cfg.loss, cfg.optim, cfg.train, precision, cache, policy="cuda")


class Jobs:
    """Training runs and traces started together in the background; `result` waits for one."""

    def __init__(self, root: Path, xdg_cache: Path):
        self.root = root
        self.env = gpu_environment(xdg_cache)
        self.plan_cache = plan_cache_in(xdg_cache)
        self.synthetic = root / "synthetic" / "data"
        self._threads = ThreadPoolExecutor(8)
        self._processes = ProcessPoolExecutor(len(MEMORY_VARIANTS) + 1, mp_context=get_context("spawn"))
        self._futures: dict[str, Future] = {}

    def start_traces(self) -> None:
        """The memory tests' traces and the probe's, one process each (tracing is single-threaded)."""
        for name, cfg in traced_configs().items():
            self._futures[f"trace:{name}"] = self._processes.submit(trace_job, cfg, "bf16", self.plan_cache)

    def start_training(self) -> None:
        """Each mode's whole run, then its resumption from step 3 in a new folder."""
        # The synthetic set generated once, here: runs started together would each generate it.
        ensure_synthetic_dataset(self.synthetic, load_run_config(TINY).data.synthetic)
        for mode in MODES:
            self._futures[mode] = self._threads.submit(self._whole, mode)
            self._futures[f"{mode}-resumed"] = self._threads.submit(self._resumed, mode)

    def start_probe(self, budget_gib: float, fraction: float) -> None:
        out = self.root / "probe"
        command = probe_command(out, self.synthetic, budget_gib, fraction)
        self._futures["probe"] = self._threads.submit(run_job, command, out, self.env)

    def result(self, name: str):
        return self._futures[name].result()

    def _whole(self, mode: str) -> Finished:
        return run_job(whole_command(mode, self.root / mode, self.synthetic), self.root / mode, self.env)

    def _resumed(self, mode: str) -> Finished:
        whole = self.result(mode)
        out = self.root / f"{mode}-resumed"
        if whole.returncode != 0:
            return Finished(out, -1, f"not resumed: the whole run failed\n{whole.output[-3000:]}")
        return run_job(resume_command(mode, whole.out, out, self.synthetic), out, self.env)

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._processes.shutdown(wait=True, cancel_futures=True)
