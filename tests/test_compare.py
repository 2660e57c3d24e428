"""launch/compare.py: networks x seeds trained and measured side by side, the transfer run from the baseline,
the report; and `train.init_weights` ignored when a run resumes. One small comparison (two networks, one
seed, one epoch each, on the tiny config) serves all the end-to-end checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from adyolo.compare import RunResult, epochs_to_reach, format_report
from tests.engine.runs import ROOT, TINY, environment, run, train_command

COMPARE = ROOT / "launch" / "compare.py"


def compare(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(COMPARE), "--config", str(TINY), "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment(), cwd=ROOT)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    overrides = [f"data.synthetic_root={out / 'data'}", "epochs=1", "train.precision=fp32"]
    result = compare(out, "--networks", "yolov5face,efficient", "--seeds", "0", "--transfer", "efficient", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, overrides, result


@pytest.mark.slow
def test_the_networks_train_and_are_reported_side_by_side(comparison):
    out, _, result = comparison
    report = json.loads((out / "compare.json").read_text())
    runs = {Path(r["folder"]).name: r for r in report["runs"]}
    assert set(runs) == {"yolov5face-seed0", "efficient-seed0", "efficient-seed0-from-yolov5face"}
    for r in runs.values():
        assert {"ap_easy", "ap_medium", "ap_hard", "ap_tiny", "map50"} <= set(r["metrics"])
        assert r["parameters"] > 0 and r["gflops"] > 0 and r["peak_memory_gib"] > 0 and len(r["curve"]) == 1
    assert runs["yolov5face-seed0"]["parameters"] != runs["efficient-seed0"]["parameters"]
    assert set(report["inference_images_per_s"]) == {"yolov5face", "efficient"}
    text = (out / "compare.md").read_text()
    assert "| yolov5face |" in text and "| efficient |" in text and "Transfer: efficient initialised from" in text
    assert text in result.stdout


@pytest.mark.slow
def test_the_transfer_run_starts_from_the_baselines_backbone(comparison):
    out, _, result = comparison
    assert "init_weights " in result.stdout and "(adyolo weights): loaded 222 of" in result.stdout
    store = out / "efficient-seed0-from-yolov5face" / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("adyolo").experiment_id])
    params = mlrun.data.params
    assert params["init.weights"] == str(out / "yolov5face-seed0" / "best.pt")
    assert params["init.loaded"] == "backbone 222" and params["init.kind"] == "adyolo weights"


@pytest.mark.slow
def test_finished_runs_are_kept_and_a_resumed_run_ignores_init_weights(comparison, tmp_path):
    out, overrides, _ = comparison
    again = compare(out, "--networks", "yolov5face", "--seeds", "0", "--transfer", "", *overrides)
    assert again.returncode == 0 and "[compare]" not in again.stdout  # nothing trained again

    folder = out / "efficient-seed0-from-yolov5face"
    missing = tmp_path / "gone.pt"
    resumed = run(
        train_command(folder, out / "data", *overrides[1:], "epochs=2", f"train.init_weights={missing}") + ["--resume"]
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "init_weights " not in resumed.stdout and "resumed from" in resumed.stdout


def test_bad_arguments_stop_before_anything_trains(tmp_path):
    result = compare(tmp_path / "out", "--networks", "yolov5face,ful")
    assert result.returncode == 2 and "--networks/--transfer take yolov5face, efficient, full" in result.stderr
    result = compare(tmp_path / "out", "model.fusoin=full")
    assert result.returncode == 2 and "model.fusoin: unknown key" in result.stderr
    assert not (tmp_path / "out").exists()


def result(network: str, seed: int, hard: float, curve=(), init=None) -> RunResult:
    metrics = {"ap_easy": 0.5, "ap_medium": 0.4, "ap_hard": hard, "ap_tiny": hard / 2, "map50": 0.3, "ap_occluded": 0.1}
    faces = {"easy": 1, "medium": 2, "hard": 3, "tiny": 1, "occluded": 1}
    folder = f"runs/{network}-{seed}"
    return RunResult(network, seed, folder, init, metrics, faces, 2, list(curve), 1000, 1.5, 2.0, 1.0, 60)


def test_the_report_reads_means_spreads_and_the_transfer_epoch():
    assert epochs_to_reach([(1, 0.1), (2, 0.3), (3, 0.25)], 0.3) == 2
    assert epochs_to_reach([(1, 0.1)], 0.3) is None
    runs = [
        result("yolov5face", 0, 0.20, [(1, 0.1), (2, 0.2)]),
        result("yolov5face", 1, 0.30, [(1, 0.2), (2, 0.3)]),
        result("efficient", 0, 0.40, [(1, 0.2), (2, 0.4)]),
        result("efficient", 0, 0.45, [(1, 0.41), (2, 0.45)], init="runs/yolov5face-0/best.pt"),
    ]
    text = format_report(runs, {"yolov5face": 12.0, "efficient": 9.0}, [0, 1], "c.yaml", [])
    assert "| yolov5face | 0.5000 +/- 0.0000 | 0.4000 +/- 0.0000 | 0.2500 +/- 0.0500 | 0.1250 +/- 0.0250 |" in text
    assert "| efficient | 0.5000 | 0.4000 | 0.4000 | 0.2000 |" in text and "| occluded |" in text
    assert "reaches it at epoch 1." in text and "best hard AP is 0.4000 (epoch 2 of 2)" in text
    assert not math.isnan(runs[0].train_images_per_s)
