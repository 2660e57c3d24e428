"""Real training runs on CPU: 2 processes per ZeRO stage and DDP, resume, signals, bad configs."""

from __future__ import annotations

import math
import signal
import subprocess
import time

import psutil
import pytest
import torch

from adyolo.weights import load_weights

from .runs import LEARNABLE, ROOT, environment, history, mlflow_run, run, train_command

pytestmark = pytest.mark.distributed


# ZeRO-1 shares ZeRO-2's optimizer and checkpoints (DeepSpeed's stage_1_and_2.py): its runs are in
# test_universal (written by two ranks, resumed on one).
@pytest.mark.parametrize("launcher,stage", [("zero2", 2), ("zero3", 3), ("ddp", 0)])
def test_two_process_bf16_run(launcher, stage, synthetic, tmp_path):
    out = tmp_path / launcher
    overrides = [
        "epochs=4",
        "train.precision=bf16",
        "train.channels_last=false",
        "train.fitness=map50",
        "log.memory_plan=true",
        *LEARNABLE,
    ]
    proc = run(train_command(out, synthetic, *overrides, launcher=launcher))
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, mlrun = mlflow_run(out)
    params = mlrun.data.params
    assert params["world_size"] == "2" and params["zero_stage"] == str(stage)
    assert params["precision_resolved"] == "bf16" and params["micro_batch"] == "2"
    assert {"rank0.host", "rank1.host"} <= set(mlrun.data.tags)
    losses = history(client, mlrun, "train/loss_total")
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses.values())
    # The localisation terms fall from the first epoch to the last; in 16 steps objectness (most of the
    # total) still moves with which images a batch holds more than with training.
    for term in ("box", "landmark"):
        series = history(client, mlrun, f"train/loss_{term}")
        values = [series[s] for s in sorted(series)]
        assert sum(values[-4:]) < sum(values[:4]), term
    # Per-rank memory: one series per rank per logged step, plus the max over ranks.
    for rank in (0, 1):
        series = history(client, mlrun, f"memory/peak_rss_gib/rank{rank}")
        assert len(series) == 16 and min(series.values()) > 0
    assert "memory/peak_rss_gib/max" in mlrun.data.metrics
    # The plan's whole-process prediction (tensors + this process's measured non-tensor memory) beside
    # the peak RSS the trainer logged for rank 0.
    assert params["plan.setting"] == "micro 2 x accum 1, ckpt off" and params["plan.device"] == "cpu"
    measured = max(history(client, mlrun, "memory/peak_rss_gib/rank0").values())
    assert float(params["plan.predicted_rss_gib"]) == pytest.approx(measured, rel=0.2)
    assert {"val/ap_hard", "val/ap_easy", "val/map50"} <= set(mlrun.data.metrics)
    # best.pt holds the weights of the best evaluation by the configured fitness metric.
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["best_fitness"] == pytest.approx(max(history(client, mlrun, "val/map50").values()))
    # Portable weights load without DeepSpeed into a plain detector.
    model, config = load_weights(out / "best.pt")
    assert config["model"]["size"] == "n" and not any(torch.isnan(p).any() for p in model.parameters())


@pytest.mark.parametrize("launcher", [None, "zero2"], ids=["one-process", "zero2"])
def test_resumed_run_matches_the_uninterrupted_one(launcher, synthetic, tmp_path):
    common = ["epochs=3", "train.precision=bf16", "train.save_interval=3", "train.keep_checkpoints=100", *LEARNABLE]
    whole = tmp_path / "whole"
    proc = run(train_command(whole, synthetic, *common, launcher=launcher))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 16 images at a global batch of 4: 4 steps per epoch, whatever the number of ranks. Step 3 is in
    # the middle of epoch 1: resume from there in a new folder.
    resumed = tmp_path / "resumed"
    proc = run(
        train_command(resumed, synthetic, *common, launcher=launcher)
        + ["--resume", str(whole / "checkpoints" / "step-00000003")]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client_a, run_a = mlflow_run(whole)
    client_b, run_b = mlflow_run(resumed)
    a, b = history(client_a, run_a, "train/loss_total"), history(client_b, run_b, "train/loss_total")
    assert sorted(b) == list(range(4, 13))
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_sigterm_saves_a_resumable_checkpoint(synthetic, tmp_path):
    out = tmp_path / "run"
    command = train_command(out, synthetic, "epochs=8", *LEARNABLE)
    proc = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environment(), cwd=ROOT
    )
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until training is under way
        if "epoch 2/8" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, rest[-2000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("-")[1])
    assert stopped_at >= 4
    finished = run(command + ["--resume"])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"step {stopped_at}" in finished.stdout
    client, mlrun = mlflow_run(out)  # the resumed job continued the same MLflow run
    assert max(history(client, mlrun, "train/loss_total")) == 8 * 4


def test_bad_config_fails_on_every_rank_before_any_work(synthetic, tmp_path):
    proc = run(train_command(tmp_path / "bad", synthetic, "train.global_batch=1", launcher="zero2"), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("train.global_batch=1 cannot be split over 2 ranks") == 1  # from the main rank
    assert not (tmp_path / "bad").exists()
    proc = run(train_command(tmp_path / "bad", synthetic, "model.fusoin=full"), timeout=60)
    assert proc.returncode == 2 and "model.fusoin: unknown key; did you mean 'fusion'?" in proc.stderr


def test_nonfinite_losses_stop_the_run_with_a_checkpoint(synthetic, tmp_path):
    out = tmp_path / "nan"
    # A learning rate this large sends the weights to infinity within a step or two.
    proc = run(
        train_command(
            out,
            synthetic,
            "optim.lr=1e30",
            "optim.warmup_epochs=0",
            "optim.warmup_min_steps=0",
            "optim.optimizer=adamw",
            "train.max_nonfinite_steps=3",
        ),
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    # The weights went non-finite before any checkpoint: none is saved, and the message says so.
    assert "3 micro-batches in a row had a non-finite loss from step" in proc.stderr
    assert "no checkpoint precedes step" in proc.stderr and not (out / "checkpoints").exists()


def test_a_dying_rank_fails_the_job_instead_of_hanging(synthetic, tmp_path):
    proc = subprocess.Popen(
        train_command(tmp_path / "dies", synthetic, "epochs=200", launcher="zero2"),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=environment(),
        cwd=ROOT,
    )
    for line in proc.stderr:  # wait until both ranks train
        if "epoch 2/200" in line:
            break
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[-1].kill()
    start = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - start < 120
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
