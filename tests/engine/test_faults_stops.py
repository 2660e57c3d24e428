"""How a tiny CPU run stops: Ctrl-C (once: like SIGTERM; twice: at once), and non-finite losses while the
weights are still finite. docs/reliability.md's fault matrix lists these cases."""

from __future__ import annotations

import signal
import time

import pytest

from .runs import (
    LIBRARY_NOISE,
    finish,
    history,
    latest,
    mlflow_run,
    one_line_error,
    run,
    start,
    train_command,
    wait_for,
)

pytestmark = pytest.mark.distributed


def test_ctrl_c_saves_like_sigterm_and_twice_stops_at_once(synthetic, tmp_path):
    out = tmp_path / "run"
    # A progress line at every step: the lines below come during training, not at an epoch's end.
    command = train_command(out, synthetic, "epochs=100", "log.progress_interval_s=0.001")
    proc = start(command)
    wait_for(proc, "epoch 2/")
    proc.send_signal(signal.SIGINT)  # what the terminal sends every process of the job on Ctrl-C
    code, stdout, stderr = finish(proc)
    assert code == 75, stderr[-3000:]
    assert "Ctrl-C: stopping after this step with a checkpoint" in stderr
    assert not any(noise in stderr for noise in (*LIBRARY_NOISE, "KeyboardInterrupt")), stderr[-3000:]
    stopped = latest(out)
    assert f"stopped by signal at step {int(stopped.split('-')[1])}; checkpoint {stopped} saved" in stdout
    assert "continue with --resume" in stdout
    client, mlrun = mlflow_run(out)
    assert mlrun.info.status == "KILLED"

    # Resumed, then Ctrl-C twice in quick succession: out at once, nothing saved, still resumable.
    proc = start(command + ["--resume"])
    wait_for(proc, "img/s")  # a step of the resumed run is done
    proc.send_signal(signal.SIGINT)
    # The key pressed again once the first press was seen (signals sent closer together may arrive as
    # one), while the step it waits for still runs.
    wait_for(proc, "Ctrl-C: stopping after this step")
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code, stdout, stderr = finish(proc)
    assert code == 130 and time.monotonic() - sent < 30, stderr[-3000:]
    assert "interrupted (Ctrl-C): stopped without saving; --resume continues from checkpoints/latest" in stdout
    assert not any(noise in stderr for noise in LIBRARY_NOISE), stderr[-3000:]
    assert latest(out) == stopped
    client, mlrun = mlflow_run(out)
    assert mlrun.info.status == "KILLED" and max(history(client, mlrun, "train/loss_total")) > int(stopped[5:13])


def test_nonfinite_losses_with_finite_weights_save_the_state_and_resume(synthetic, tmp_path):
    """A loss that overflows while the weights stay finite (what a data fault does: the step is skipped,
    nothing non-finite reaches the weights) stops the run with a checkpoint of that finite state."""
    out = tmp_path / "run"
    proc = run(train_command(out, synthetic, "loss.obj=1e38", "train.max_nonfinite_steps=3"), timeout=180)
    assert proc.returncode == 3, proc.stderr[-3000:]
    one_line_error(
        proc,
        "3 micro-batches in a row had a non-finite loss; checkpoint step-00000000 saved. Check the data or lower "
        "optim.lr, then --resume",
    )
    assert latest(out) == "step-00000000"
    client, mlrun = mlflow_run(out)
    assert mlrun.info.status == "FAILED" and history(client, mlrun, "train/nonfinite_steps") == {0: 3.0}
    resumed = run(train_command(out, synthetic, "epochs=1") + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000000: epoch 1, step 0" in resumed.stdout
    client, mlrun = mlflow_run(out)
    assert mlrun.info.status == "FINISHED" and sorted(history(client, mlrun, "train/loss_total")) == [1]
