"""Evaluation of trained weights (`adyolo.eval.job`, what launch/evaluate.py runs) on the trained tiny
detector: real AP, the same numbers as predict + score, one or two processes, MLflow, the official
prediction files, and bad input stopping before any work."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from adyolo.data.dataset import FaceDataset, build_loader, list_images
from adyolo.engine.accelerator import InferenceProcesses
from adyolo.eval.evaluator import SIZE_DIFFICULTY, official_predictions, predict, score
from adyolo.eval.job import EvaluationRequest, InputError, evaluate_weights
from adyolo.eval.widerface.prediction_files import read_prediction_dir
from adyolo.eval.widerface.protocol import keep_by_size
from adyolo.model import build_model
from adyolo.weights import load_weights, save_weights
from tests.engine.runs import ACCELERATE, ROOT, environment, mlflow_run

from .helpers import val_images

CONF = 0.001  # the tiny detector's scores are low; the default 0.02 would leave no detections


def evaluate(weights, out, **settings) -> None:
    """One process, as `python launch/evaluate.py` runs it (data loading in this process)."""
    evaluate_weights(EvaluationRequest(str(weights), out=str(out), workers=0, **settings), InferenceProcesses)


def metrics_of(out) -> dict[str, float]:
    return json.loads((out / "metrics.json").read_text())["metrics"]


def test_trained_weights_beat_untrained_and_match_predict_and_score(trained_run, tmp_path, capsys):
    weights = trained_run / "best.pt"
    # Default data: the val split of the run the weights came from (here the synthetic one).
    evaluate(weights, tmp_path / "trained", conf=CONF, mlflow="", save_txt=True)
    printed = capsys.readouterr().out
    assert "easy" in printed and "mAP@0.5" in printed
    trained = metrics_of(tmp_path / "trained")
    record = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert record["data"] == str(val_images(trained_run)) and record["images"] == 8
    assert (tmp_path / "trained" / "pr_curve.png").stat().st_size > 0

    model, config = load_weights(weights)
    torch.manual_seed(0)
    untrained = tmp_path / "untrained.pt"
    save_weights(untrained, build_model(config["model"]).state_dict(), config)
    evaluate(untrained, tmp_path / "untrained", data=str(val_images(trained_run)), conf=CONF)
    baseline = metrics_of(tmp_path / "untrained")
    assert trained["ap_easy"] > 0.15 > 0.05 > baseline["ap_easy"], (trained, baseline)
    assert trained["ap_hard"] > 2 * baseline["ap_hard"] and trained["map50"] > 2 * baseline["map50"]

    # The job adds nothing of its own to the numbers.
    dataset = FaceDataset(list_images(val_images(trained_run)), config["model"]["img_size"])
    predictions = predict(model, build_loader(dataset, 16, False, 0, 0), torch.device("cpu"), None, CONF)
    direct, _ = score(predictions)
    assert trained == pytest.approx(direct, abs=1e-9)
    # The official prediction files (--save-txt) hold exactly those detections, per "<event>/<image>" id.
    written = read_prediction_dir(tmp_path / "trained" / "widerface_txt")
    expected = official_predictions(predictions)
    assert sorted(written) == sorted(expected) and all(k.startswith("images/") for k in written)
    for key, rows in expected.items():
        np.testing.assert_allclose(written[key], rows)

    client, mlrun = mlflow_run(tmp_path / "trained")
    assert mlrun.data.metrics["eval/ap_easy"] == pytest.approx(trained["ap_easy"], rel=1e-5)  # logged to 6 digits
    assert mlrun.data.params["images"] == "8"
    assert {a.path for a in client.list_artifacts(mlrun.info.run_id)} >= {"metrics.json", "plots"}


def test_bad_input_stops_before_any_work(trained_run, tmp_path):
    weights = trained_run / "best.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    unlabelled = tmp_path / "unlabelled" / "images"
    unlabelled.mkdir(parents=True)
    shutil.copy(next(val_images(trained_run).glob("*.jpg")), unlabelled)
    cases = {
        "no such weights file": (tmp_path / "missing.pt", {}),
        "no images": (weights, {"data": str(empty)}),
        "none of the 1 images has a label file": (weights, {"data": str(unlabelled)}),
        "multiple of the model's largest stride": (weights, {"img": 100}),
        "--batch 0: must be at least 1": (weights, {"batch": 0}),
    }
    for message, (path, settings) in cases.items():
        with pytest.raises(InputError, match=re.escape(message)) as err:
            evaluate(path, tmp_path / "out", **settings)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written before the input was checked


def test_the_script_exits_with_code_2_and_one_line(tmp_path):
    """Once as a real process: the message and the exit code reach the shell."""
    command = [sys.executable, str(ROOT / "launch" / "evaluate.py"), "--weights", str(tmp_path / "missing.pt")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment(), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no such weights file" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_official_difficulty_lists_that_follow_the_size_rule_give_the_size_based_ap(trained_run, tmp_path):
    """--gt-mat reads WIDER's eval_tools .mat files. Written here from the val labels, with each setting's
    list holding exactly the faces the size rule keeps, they must give the size-based numbers."""
    model, config = load_weights(trained_run / "best.pt")
    dataset = FaceDataset(list_images(val_images(trained_run)), config["model"]["img_size"])
    predictions = predict(model, build_loader(dataset, 16, False, 0, 0), torch.device("cpu"), None, CONF)
    size_based, _ = score(predictions)
    stems = [Path(path).stem for path, _, _ in predictions]
    boxes = [gt.astype(np.float64) for _, _, gt in predictions]
    gt_dir = tmp_path / "ground_truth"
    gt_dir.mkdir()
    # One event named like the images' folder: the official image id is "<event>/<file stem>".
    savemat(
        gt_dir / "wider_face_val.mat",
        {"event_list": _cell(["images"]), "file_list": _cell([_cell(stems)]), "face_bbx_list": _cell([_cell(boxes)])},
    )
    for setting in ("easy", "medium", "hard"):
        kept = [np.flatnonzero(keep_by_size(b, SIZE_DIFFICULTY)[setting])[:, None] + 1 for b in boxes]  # 1-based
        savemat(gt_dir / f"wider_{setting}_val.mat", {"gt_list": _cell([_cell(kept)])})

    evaluate(trained_run / "best.pt", tmp_path / "official", conf=CONF, gt_mat=str(gt_dir))
    official = metrics_of(tmp_path / "official")
    assert official == pytest.approx(size_based, abs=1e-9) and official["ap_hard"] > 0
    assert json.loads((tmp_path / "official" / "metrics.json").read_text())["difficulty"] == f"official ({gt_dir})"

    # An image the official lists do not know is an error naming it, not a silently lower recall.
    savemat(
        gt_dir / "wider_face_val.mat",
        {
            "event_list": _cell(["images"]),
            "file_list": _cell([_cell(stems[1:])]),
            "face_bbx_list": _cell([_cell(boxes[1:])]),
        },
    )
    for setting in ("easy", "medium", "hard"):
        kept = [np.flatnonzero(keep_by_size(b, SIZE_DIFFICULTY)[setting])[:, None] + 1 for b in boxes[1:]]
        savemat(gt_dir / f"wider_{setting}_val.mat", {"gt_list": _cell([_cell(kept)])})
    with pytest.raises(InputError, match=re.escape(f"(id images/{stems[0]}) is not in the official ground truth")):
        evaluate(trained_run / "best.pt", tmp_path / "unknown", conf=CONF, gt_mat=str(gt_dir))


def _cell(items) -> np.ndarray:
    """A MATLAB column cell array, as scipy writes it: object array [K, 1]."""
    cell = np.empty((len(items), 1), dtype=object)
    for index, item in enumerate(items):
        cell[index, 0] = item
    return cell


@pytest.mark.distributed
def test_two_processes_give_the_same_metrics_as_one(trained_run, tmp_path):
    """7 images over 2 processes: accelerate pads one rank's shard; a padded image must count once."""
    data = tmp_path / "val" / "images"
    shutil.copytree(val_images(trained_run), data)
    shutil.copytree(val_images(trained_run).parent / "labels", data.parent / "labels")
    next(data.glob("*.jpg")).unlink()
    evaluate(trained_run / "best.pt", tmp_path / "one", data=str(data), conf=CONF, batch=2)
    args = ["--weights", trained_run / "best.pt", "--data", data, "--conf", CONF, "--workers", 0, "--batch", 2]
    config = ROOT / "ds_configs" / "accelerate_ddp.yaml"
    launcher = [ACCELERATE, "launch", "--config_file", config, "--num_processes", 2, "--main_process_port", 0]
    command = [*launcher, ROOT / "launch" / "evaluate.py", *args, "--out", tmp_path / "two"]
    proc = subprocess.run(
        list(map(str, command)), capture_output=True, text=True, timeout=300, env=environment(), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2
    assert metrics_of(tmp_path / "two") == pytest.approx(metrics_of(tmp_path / "one"), abs=1e-6)
    assert metrics_of(tmp_path / "one")["ap_easy"] > 0.05
