"""Helpers that start real training runs (one process, or two through `accelerate launch`) and
read what they left behind."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).parents[2]
TRAIN = ROOT / "launch" / "train.py"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
ACCELERATE = Path(sys.executable).with_name("accelerate")
LAUNCH = ROOT / "launch" / "launch.py"
LIBRARY_NOISE = ("Traceback", "ChildFailedError", "torch.distributed.elastic")

# Augmentation off and AdamW: the loss of a tiny run then falls within a few steps.
LEARNABLE = [
    "data.augment.mosaic=0",
    "data.augment.fliplr=0",
    "data.augment.scale=0",
    "data.augment.translate=0",
    "data.augment.hsv_h=0",
    "data.augment.hsv_s=0",
    "data.augment.hsv_v=0",
    "optim.optimizer=adamw",
    "optim.lr=0.002",
    "optim.warmup_epochs=0",
    "optim.warmup_min_steps=0",
]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def train_command(
    out: Path,
    synthetic: Path,
    *overrides: str,
    launcher: str | None = None,
    processes: int = 2,
    config: Path | None = TINY,
) -> list[str]:
    """The command of a run; `config=None` uses train.py's own default (the embedded default)."""
    # The tiny runs' figures and tolerances are fp32's, where `auto` would pick bf16 on a CPU with native
    # bf16; a DeepSpeed run takes its JSON's precision, and a test's own override comes later and wins.
    fp32 = ["train.precision=fp32"] if config == TINY and launcher in (None, "ddp") else []
    args = [
        str(TRAIN),
        *(["--config", str(config)] if config else []),
        f"output_dir={out}",
        f"data.synthetic_root={synthetic}",
        *fp32,
        *overrides,
    ]
    if launcher is None:
        return [sys.executable, *args]
    return [
        str(ACCELERATE),
        "launch",
        "--config_file",
        str(ROOT / "ds_configs" / f"accelerate_{launcher}.yaml"),
        "--num_processes",
        str(processes),
        "--main_process_port",
        "0",
        *args,
    ]


def run(command: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `command` to its end in the tests' environment (plus `env`)."""
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**environment(), **env}, cwd=ROOT
    )


def start(command: list[str], **env: str) -> subprocess.Popen:
    """Start `command` in a session of its own (so it can be signalled alone), stdout and stderr piped."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**environment(), **env},
        cwd=ROOT,
        start_new_session=True,
    )


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 180) -> str:
    """Read `proc`'s stderr until `text` appears (progress bars redraw without newlines); returns what
    was read. Fails if the process ends or `timeout` passes first."""
    seen, deadline = b"", time.time() + timeout
    while text.encode() not in seen:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        chunk = os.read(proc.stderr.fileno(), 65536) if ready else b""
        assert chunk or not ready, f"ended ({proc.poll()}) before {text!r}:\n{seen.decode()[-3000:]}"
        assert time.time() < deadline, f"no {text!r} in {timeout} s:\n{seen.decode()[-3000:]}"
        seen += chunk
    return seen.decode()


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a started process, once it has ended."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def wrapped(command: list[str]) -> list[str]:
    """The same `accelerate launch` command through launch/launch.py."""
    assert Path(command[0]) == ACCELERATE and command[1] == "launch"
    return [sys.executable, str(LAUNCH), *command[2:]]


def one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    """Exactly one `error:` line, holding `text`, and no library traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], proc.stderr[-3000:]
    assert not any(noise in proc.stderr for noise in LIBRARY_NOISE), proc.stderr[-3000:]


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def mlflow_run(out: Path):
    """The single MLflow run in a run directory's default store: (client, run)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def history(client, run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
