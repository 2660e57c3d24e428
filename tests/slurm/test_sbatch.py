"""`sbatch slurm/train.sh` on a real two-node Slurm cluster (slurmctld + 2 slurmd on this machine)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from ..engine.runs import ROOT, environment, history, mlflow_run
from .cluster import slurm_available, start_cluster

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not slurm_available(), reason="Slurm is not installed (CI installs it: see .ci/run)"),
]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def sbatch(cluster, out: Path, *train_args: str, wait: bool) -> subprocess.CompletedProcess:
    """Submit slurm/train.sh with the tiny config on 2 nodes x 1 CPU process (no GPUs here)."""
    env = cluster.env(
        **{k: v for k, v in environment().items() if k != "SLURM_CONF"}, PROCS_PER_NODE="1", OUTPUT_DIR=str(out / "run")
    )
    command = [
        "sbatch",
        "--wait" if wait else "--parsable",
        "--nodes=2",
        "--gres=none",
        "--cpus-per-task=1",
        "--time=00:20:00",
        f"--output={out}/%x-%j.out",
        "slurm/train.sh",
        "tests/configs/tiny.yaml",
        f"data.synthetic_root={out / 'synthetic'}",
        "train.precision=bf16",
        "train.channels_last=false",
        *train_args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def wait_for_log(out: Path, job: str, text: str, timeout: float = 180) -> str:
    log = out / f"adyolo-{job}.out"
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = log.read_text(errors="ignore") if log.exists() else ""
        if text in content:
            return content
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared in {log}")


def wait_for_end(cluster, job: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = cluster.job_state(job)
        if state in FINAL:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {cluster.job_state(job)} after {timeout:.0f} s")


def test_two_nodes_train_to_completion_under_zero2(cluster, tmp_path):
    """A global batch the ranks do not divide (3 images over 2 ranks) trains all of it every step."""
    proc = sbatch(cluster, tmp_path, "train.global_batch=3", wait=True)
    job = proc.stdout.split()[-1]
    log = (tmp_path / f"adyolo-{job}.out").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "2 nodes x 1 processes" in log and "DeepSpeed ZeRO-2" in log
    assert "global batch 3 = 1 rank x 2 + 1 rank x 1 images" in log
    client, run = mlflow_run(tmp_path / "run")
    assert run.data.params["world_size"] == "2" and run.data.params["zero_stage"] == "2"
    assert run.data.tags["slurm.job_id"] == job and run.data.tags["slurm.job_nodelist"] == "n[1-2]"
    for rank in (0, 1):  # both ranks took part and reported their memory: 2 epochs of 16 // 3 steps
        assert len(history(client, run, f"memory/peak_rss_gib/rank{rank}")) == 10
    assert (tmp_path / "run" / "best.pt").exists()


def test_preemption_signal_saves_requeues_and_resumes(cluster, tmp_path):
    proc = sbatch(cluster, tmp_path, "epochs=12", wait=False)
    job = proc.stdout.strip()
    wait_for_log(tmp_path, job, "epoch 3/12")
    # What Slurm sends before the time limit (--signal=B:USR1@300), sent now.
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    assert wait_for_end(cluster, job, timeout=420) == "COMPLETED"
    log = (tmp_path / f"adyolo-{job}.out").read_text()
    assert "requeueing job" in log and "(restart 1)" in log
    # The signal may land in a step or in validation; the message names the checkpoint it saved.
    saved = re.search(r"stopped by signal.* at step \d+; checkpoint (\S+) saved", log)
    assert saved, log[-3000:]
    assert f"resumed from {tmp_path}/run/checkpoints/{saved.group(1)}" in log
    client, run = mlflow_run(tmp_path / "run")  # one MLflow run across the requeue
    assert max(history(client, run, "train/loss_total")) == 12 * 4
    assert run.data.tags["slurm.restart_count"] == "1"


def test_a_failing_rank_fails_the_job(cluster, tmp_path):
    proc = sbatch(cluster, tmp_path, "epochs=200", wait=False)
    job = proc.stdout.strip()
    wait_for_log(tmp_path, job, "epoch 2/200")
    workers = [p for p in psutil.process_iter(["cmdline"]) if _is_training_process(p.info["cmdline"] or [], tmp_path)]
    assert len(workers) == 2, [p.info["cmdline"] for p in workers]
    start = time.time()
    workers[-1].kill()
    assert wait_for_end(cluster, job, timeout=180) == "FAILED"
    assert time.time() - start < 180


def _is_training_process(cmdline: list[str], out: Path) -> bool:
    """A rank of this test's job: python running launch/train.py (not srun or the accelerate launcher)."""
    line = " ".join(cmdline)
    return (
        bool(cmdline)
        and Path(cmdline[0]).name.startswith("python")
        and "launch/train.py" in line
        and str(out) in line
        and "accelerate" not in line
    )
