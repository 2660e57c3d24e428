"""Fault injection on tiny CPU runs (1 and 2 processes): every failure gives its documented exit code
and one line, through the launchers, and `latest` always resumes. docs/reliability.md's fault matrix
lists these cases."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from adyolo.config import load_run_config
from adyolo.data.labels import write_label_file
from adyolo.failures import RunFailure
from adyolo.run import build_run

from .runs import (
    ACCELERATE,
    LEARNABLE,
    ROOT,
    TINY,
    TRAIN,
    environment,
    history,
    latest,
    mlflow_run,
    one_line_error,
    run,
    train_command,
    wrapped,
)

pytestmark = pytest.mark.distributed


def user_dataset(root: Path, images: int, faces_per_image: int = 1, labels: str = "labels") -> Path:
    """`root/images/*.jpg` with YOLO-face labels in `root/<labels>/`: returns the images folder."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for i in range(images):
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), rng.integers(0, 255, (64, 64, 3), np.uint8))
        rows = np.array([[0, 0.5, 0.5, 0.3, 0.3, *([-1] * 10)]] * faces_per_image, np.float32)
        write_label_file(root / labels / f"{i}.txt", rows)
    return root / "images"


# ----------------------------------------------------------------------------------------------
def test_exit_codes_survive_the_launcher(synthetic, tmp_path):
    """A bad config on 2 ranks: one line, code 2 through launch/launch.py; `accelerate launch` alone
    reports 1 (torchrun's own code) but still one line from the ranks."""
    bad = train_command(tmp_path / "bad", synthetic, "train.global_batch=1", launcher="zero2")
    proc = run(wrapped(bad), timeout=120)
    assert proc.returncode == 2
    one_line_error(proc, "train.global_batch=1 cannot be split over 2 ranks")
    plain = run(bad, timeout=120)
    assert plain.returncode == 1 and plain.stderr.count("cannot be split over 2 ranks") == 1
    # DeepSpeed's own launcher passes the ranks' code on as it is.
    deepspeed = [str(ACCELERATE.with_name("deepspeed")), "--num_gpus", "2", *bad[bad.index(str(TRAIN)) :]]
    proc = subprocess.run(
        deepspeed, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**environment(), "DS_ACCELERATOR": "cpu"}
    )
    assert proc.returncode == 2 and (proc.stdout + proc.stderr).count("cannot be split over 2 ranks") == 1
    # A DeepSpeed JSON that is not there: named once, before any process group.
    config = tmp_path / "accelerate.yaml"
    text = (ROOT / "ds_configs" / "accelerate_zero2.yaml").read_text()
    config.write_text(text.replace("ds_configs/zero2.json", str(tmp_path / "missing.json")))
    command = wrapped(bad)
    command[command.index("--config_file") + 1] = str(config)
    command[-1] = "train.global_batch=4"
    proc = run(command, timeout=120)
    assert proc.returncode == 2
    one_line_error(proc, "missing.json")
    assert not (tmp_path / "bad").exists()


def test_bad_input_stops_before_any_work_with_the_fix(synthetic, tmp_path, monkeypatch):
    """Through the command line once (code 2, one line, nothing written); the other inputs in this
    process: `build_run` refuses them before any process group, the same exception train.py prints."""
    out = tmp_path / "out"
    good = user_dataset(tmp_path / "good", 6)
    proc = run(train_command(out, synthetic, f"data.train={tmp_path / 'nowhere'}", f"data.val={good}"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_line_error(proc, "data.train: ")
    assert not out.exists()  # nothing written

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # build_run sets it on CPU; put back after the test

    def fails(*overrides: str, resume: str | None = None, expect: str) -> None:
        cfg = load_run_config(TINY, [f"output_dir={out}", f"data.synthetic_root={synthetic}", *overrides])
        with pytest.raises(RunFailure) as refused:
            build_run(cfg, resume)
        assert refused.value.exit_code == 2 and expect in str(refused.value) and "\n" not in str(refused.value)
        assert not out.exists()

    broken = user_dataset(tmp_path / "broken", 6)
    (tmp_path / "broken" / "labels" / "2.txt").write_text("0 0.5 nan 0.2 0.2\n")
    fails(
        f"data.train={broken}",
        f"data.val={good}",
        "train.global_batch=2",
        expect=f"data.train: {tmp_path / 'broken' / 'labels' / '2.txt'}:1: non-finite value",
    )
    misnamed = user_dataset(tmp_path / "misnamed", 6, labels="label")
    fails(
        f"data.train={misnamed}", f"data.val={good}", "train.global_batch=2", expect="none of its 6 images has a label"
    )
    no_faces = user_dataset(tmp_path / "empty", 4, faces_per_image=0)
    fails(
        f"data.train={good}",
        f"data.val={no_faces}",
        "train.global_batch=2",
        expect="data.val: its 4 label files hold no faces; AP cannot be measured",
    )
    fails(
        f"data.train={good}",
        f"data.val={good}",
        "train.global_batch=8",
        expect="data.train has 6 images, fewer than train.global_batch=8",
    )
    fails(expect="no checkpoint to resume", resume="latest")


def test_skipped_labels_dropped_boxes_and_unreadable_images_are_counted(tmp_path):
    data = tmp_path / "data"
    images = user_dataset(data, 8)
    (data / "labels" / "1.txt").write_text("0 0.5 0.5 0.3 0.3\n0 0.5 0.5\n0 1.5 0.5 0.2 0.2\n")
    whole = (images / "3.jpg").read_bytes()
    (images / "3.jpg").write_bytes(whole[: len(whole) // 2])  # truncated
    out = tmp_path / "run"
    overrides = [
        f"data.train={images}",
        f"data.val={images}",
        "train.global_batch=4",
        "data.skip_bad_labels=true",
        "epochs=2",
        "data.augment.mosaic=0",
    ]
    proc = run(train_command(out, tmp_path / "unused", *overrides), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "data: train 8 images, 8 label files, 8 faces, 1 malformed label lines skipped, 1 boxes dropped" in proc.stdout
    )
    client, mlrun = mlflow_run(out)
    params = mlrun.data.params
    assert (params["data.train_skipped_label_lines"], params["data.train_dropped_boxes"]) == ("1", "1")
    # The truncated JPEG is met every epoch, in every read: it counts once.
    assert set(history(client, mlrun, "train/skipped_images").values()) == {1.0}


def test_a_finished_run_folder_is_not_overwritten_and_a_copy_resumes_in_place(synthetic, tmp_path):
    out = tmp_path / "run"
    common = ["epochs=1", "train.save_interval=4"]  # the epoch-end save lands on the step just saved
    assert run(train_command(out, synthetic, *common)).returncode == 0
    # The second save at step 4 went to a new folder: `latest` was never rewritten in place.
    assert latest(out) == "step-00000004-1" and (out / "checkpoints" / "step-00000004").is_dir()
    again = run(train_command(out, synthetic, *common), timeout=120)
    assert again.returncode == 2
    one_line_error(again, "already holds a run (checkpoints/latest -> step-00000004-1)")
    # A copied run folder continues in its new place, its MLflow artifacts too.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = run(train_command(copy, synthetic, "epochs=2", "train.save_interval=4") + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the original is untouched
    client, mlrun = mlflow_run(copy)
    assert mlrun.info.artifact_uri.startswith(copy.resolve().as_uri())
    assert client.list_artifacts(mlrun.info.run_id, "last")  # read from the copy: its artifact_uri
    assert max(history(client, mlrun, "train/loss_total")) == 8
    # --exist-ok starts over in place: a new run, new checkpoints only.
    proc = run(train_command(out, synthetic, *common) + ["--exist-ok"])
    assert proc.returncode == 0 and latest(out) == "step-00000004-1"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000004-1"]


def test_nonfinite_stop_keeps_a_finite_latest_that_resumes(synthetic, tmp_path):
    out = tmp_path / "nan"
    common = [
        "optim.warmup_epochs=0",
        "optim.warmup_min_steps=0",
        "optim.optimizer=adamw",
        "train.max_nonfinite_steps=3",
        "train.save_interval=1",
    ]
    first = run(wrapped(train_command(out, synthetic, *common, "epochs=1", "optim.lr=0.002", launcher="zero2")))
    assert first.returncode == 0, first.stderr[-3000:]
    # A learning rate this large sends the weights to infinity within a step or two.
    blown = train_command(out, synthetic, *common, "epochs=3", "optim.lr=1e30", launcher="zero2")
    proc = run(wrapped(blown) + ["--resume"], timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    one_line_error(
        proc,
        "non-finite loss from step 5 on and the weights are no longer finite (not saved); latest "
        "now points to step-00000004-1",
    )
    assert latest(out) == "step-00000004-1"
    client, mlrun = mlflow_run(out)
    assert mlrun.info.status == "FAILED" and history(client, mlrun, "train/nonfinite_steps")
    calm = train_command(out, synthetic, *common, "epochs=2", "optim.lr=0.002", launcher="zero2")
    proc = run(wrapped(calm) + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(torch.isfinite(v).all() for v in torch.load(out / "last.pt", weights_only=True)["model"].values())


def test_sigterm_during_validation_saves_and_resume_evaluates(tmp_path):
    """Validation long enough to be interrupted: the run saves at once and the resumed run evaluates."""
    out = tmp_path / "run"
    synthetic = tmp_path / "synthetic"
    command = train_command(out, synthetic, "epochs=1", "data.synthetic.num_val=300")
    proc = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment(), cwd=ROOT
    )
    buffered = ""
    while "epoch 1/1:" not in buffered:  # the epoch's line (in a file, printed as it ends): validation starts
        buffered += proc.stderr.read(1)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out_text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75 and time.time() - sent < 30
    assert "stopped by signal during validation (epoch 1 is evaluated on --resume) at step 4" in out_text
    assert not (out / "best.pt").exists()
    resumed = run(command + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1: ap_easy" in resumed.stdout and (out / "best.pt").is_file()


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=environment(),
        cwd=ROOT,
        start_new_session=True,
    )


def _wait_training(proc: subprocess.Popen) -> list[psutil.Process]:
    for line in proc.stderr:  # until both ranks train
        if "epoch 2/" in line:
            break
    children = psutil.Process(proc.pid).children(recursive=True)
    # The ranks run train.py; `accelerate launch` (under launch.py) names it among its own arguments.
    ranks = [p for p in children if "train.py" in " ".join(p.cmdline()) and "launch" not in p.cmdline()]
    assert len(ranks) == 2
    return ranks


@pytest.mark.parametrize("how", ["SIGUSR1 to launch.py", "kill -9 of accelerate launch"])
def test_no_rank_outlives_its_launcher(how, synthetic, tmp_path):
    out = tmp_path / "run"
    command = train_command(out, synthetic, "epochs=200", launcher="zero2")
    proc = _start(wrapped(command) if how.startswith("SIGUSR1") else command)
    ranks = _wait_training(proc)
    if how.startswith("SIGUSR1"):
        proc.send_signal(signal.SIGUSR1)  # what Slurm sends before the time limit: handled like SIGTERM
        proc.stderr.read()
        assert proc.wait(timeout=120) == 75
    else:
        proc.kill()
        proc.stderr.read()  # until the ranks, which hold its write end, are gone
    psutil.wait_procs(ranks, timeout=60)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    stopped = int(latest(out).split("-")[1])  # the ranks saved before they stopped
    assert stopped >= 4
    resumed = run(wrapped(train_command(out, synthetic, "epochs=3", launcher="zero2")) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_resume_on_another_number_of_ranks(synthetic, tmp_path):
    """A DDP checkpoint of 2 ranks resumes on 1 at the same position in the epoch; a ZeRO-2 one cannot,
    and says what to do."""
    common = ["epochs=2", "train.save_interval=2", "train.keep_checkpoints=100", *LEARNABLE]
    ddp = tmp_path / "ddp"
    proc = run(train_command(ddp, synthetic, *common, launcher="ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(
        train_command(ddp, synthetic, *common, "epochs=3") + ["--resume", str(ddp / "checkpoints" / "step-00000006")]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-00000006 (written by 2 ranks): epoch 2, step 6" in proc.stdout
    client, mlrun = mlflow_run(ddp)
    assert max(history(client, mlrun, "train/loss_total")) == 12
    zero = tmp_path / "zero"
    assert run(train_command(zero, synthetic, "epochs=1", launcher="zero2")).returncode == 0
    proc = run(train_command(zero, synthetic, "epochs=2") + ["--resume"], timeout=120)
    assert proc.returncode == 2
    one_line_error(proc, "cannot be resumed without DeepSpeed")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_named_and_latest_stays_intact(synthetic, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:  # a container without the capability: there is no small disk to fill here
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "run"
        proc = _start(train_command(out, synthetic, "epochs=100", "train.save_interval=2"))
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").is_file() and time.time() < deadline:
            time.sleep(0.2)
        kept = latest(out)
        with open(disk / "filler", "wb") as filler:  # fill what is left
            try:
                while True:
                    filler.write(b"\0" * 2**20)
                    filler.flush()
            except OSError:
                pass
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 74, rest[-3000:]
        errors = [line for line in rest.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "disk full" in errors[0] and "is intact" in errors[0], rest[-3000:]
        assert latest(out) == kept or int(latest(out).split("-")[1]) > int(kept.split("-")[1])
        (disk / "filler").unlink()
        client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
        run_info = client.search_runs([e.experiment_id for e in client.search_experiments()])[0].info
        assert run_info.status == "FAILED"
        resumed = run(train_command(out, synthetic, "epochs=2") + ["--resume"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
