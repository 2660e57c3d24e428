"""The YOLOv5-Face baseline (`model.neck=yolov5face`) trains through launch/train.py like the GD detector:
3-level loss, its own run name, anchors and loss weights in the saved config, portable weights."""

from __future__ import annotations

import pytest
import yaml

from adyolo.weights import load_weights
from tests.engine.runs import LEARNABLE, mlflow_run, run, train_command


@pytest.mark.slow
def test_one_epoch_of_the_baseline(tmp_path):
    out = tmp_path / "run"
    proc = run(train_command(out, tmp_path / "synthetic", *LEARNABLE, "epochs=1", "model.neck=yolov5face"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "YOLOv5-Face size=n neck=yolov5face" in proc.stdout
    _, mlrun = mlflow_run(out)
    assert mlrun.info.run_name == "yolov5face-n-96px-1cpu"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["neck"] == "yolov5face" and len(saved["model"]["anchors"]) == 3
    assert saved["loss"]["balance"] == [4.0, 1.0, 0.4]
    model, config = load_weights(out / "best.pt")
    assert model.strides == [8, 16, 32] and config["model"]["anchors"] == saved["model"]["anchors"]
