"""Faults of the run folder on tiny CPU runs: two runs started into one folder, a run killed with its lock
held, a checkpoint damaged after it was written. docs/reliability.md's fault matrix lists these cases."""

from __future__ import annotations

import socket

import pytest

from .runs import (
    history,
    latest,
    mlflow_run,
    one_line_error,
    run,
    start,
    train_command,
    wait_for,
    wrapped,
)
from .test_run_lock import holding

pytestmark = pytest.mark.distributed


def test_one_run_writes_a_folder_and_a_dead_runs_lock_is_taken_over(synthetic, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # Two jobs started at once (a double submission): the one that takes the lock first is starting, the
    # other's main rank finds it taken after its process group formed; both its ranks stop before writing.
    starting = holding(out, os_lock_only=True)
    try:
        proc = run(wrapped(train_command(out, synthetic, launcher="ddp")), timeout=180)
    finally:
        starting.kill()
        starting.wait()
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_line_error(proc, f"output_dir={out} is being taken by another run that is starting")
    assert [p.name for p in out.iterdir()] == ["run.lock"]  # nothing written

    first = start(train_command(out, synthetic, "epochs=100", "train.save_interval=1"))
    try:
        wait_for(first, "epoch 2/")
        second = run(train_command(out, synthetic, "epochs=100") + ["--resume"], timeout=120)
        assert second.returncode == 2
        one_line_error(second, f"in use by another run: pid {first.pid} on {socket.gethostname()} (since ")
        assert "--force-unlock" in second.stderr
    finally:
        first.kill()  # kill -9: the lock file stays behind, naming a process that is gone
        first.communicate()
    assert (out / "run.lock").is_file()
    resumed = run(train_command(out, synthetic, "epochs=2", "train.save_interval=1") + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"was locked by pid {first.pid} on {socket.gethostname()}" in resumed.stderr
    assert "taken over (its process ended)" in resumed.stderr
    assert not (out / "run.lock").exists()  # released at the end


def test_a_damaged_latest_falls_back_to_an_intact_checkpoint(synthetic, tmp_path):
    """One flipped byte in the weights `latest` holds: `--resume <that folder>` stops (exit 2) naming the
    file and the intact checkpoint; `--resume` resumes from that one, redoing the steps since, exactly."""
    out = tmp_path / "run"
    common = ["train.save_interval=3"]
    proc = run(train_command(out, synthetic, "epochs=1", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest(out) == "step-00000004"
    weights = out / "checkpoints" / "step-00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    proc = run(train_command(out, synthetic, "epochs=2", *common) + ["--resume", str(weights.parent)], timeout=120)
    assert proc.returncode == 2
    one_line_error(
        proc,
        f"the checkpoint is damaged: model.safetensors: its content differs from when it was written (CRC-32); "
        f"intact: {out / 'checkpoints' / 'step-00000003'}",
    )
    proc = run(train_command(out, synthetic, "epochs=2", *common) + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(checkpoints/latest) is damaged: model.safetensors" in proc.stderr
    assert "resuming from step-00000003, the newest intact checkpoint" in proc.stderr
    assert (out / "checkpoints" / "damaged-step-00000004" / "model.safetensors").read_bytes() == bytes(data)
    assert "step-00000003: epoch 1, step 3" in proc.stdout
    client, mlrun = mlflow_run(out)
    assert mlrun.data.tags["resume.fallback"] == "step-00000003"
    assert mlrun.data.tags["resume.damaged"].startswith("step-00000004 (model.safetensors: its content differs")
    # Step 4 was trained twice, from the same state: the same loss both times.
    redone = [m.value for m in client.get_metric_history(mlrun.info.run_id, "train/loss_total") if m.step == 4]
    assert len(redone) == 2 and redone[0] == pytest.approx(redone[1], rel=1e-6)
    assert max(history(client, mlrun, "train/loss_total")) == 8
