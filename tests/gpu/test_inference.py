"""Trained weights of a GPU run used on the GPU: detection and evaluation on CUDA (the same scores as on
the CPU), and ONNX export of the weights the GPU trained."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adyolo.engine.accelerator import InferenceProcesses
from adyolo.eval.job import EvaluationRequest, evaluate_weights
from adyolo.export.job import ExportRequest, export_weights
from adyolo.predict.job import DetectionRequest, detect

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def trained(jobs):
    result = jobs.result("plain")
    assert result.returncode == 0, result.output[-4000:]
    return result.out / "best.pt", jobs.synthetic / "val" / "images"


def test_detect_on_cuda(trained, tmp_path, capsys):
    weights, images = trained
    path = detect(DetectionRequest(str(weights), str(images), out=str(tmp_path), conf=0.01, device="cuda", batch=4))
    record = json.loads(path.read_text())
    assert len(record["images"]) == len(list(images.glob("*.jpg"))) > 0
    assert "(batch 4, cuda" in capsys.readouterr().out


def test_evaluate_on_cuda_scores_as_on_cpu(trained, tmp_path):
    weights, _ = trained
    metrics = {}
    for device in ("cuda", "cpu"):
        request = EvaluationRequest(str(weights), out=str(tmp_path / device), workers=0, device=device, conf=0.001)
        evaluate_weights(request, InferenceProcesses)
        metrics[device] = json.loads((tmp_path / device / "metrics.json").read_text())["metrics"]
    assert {"ap_easy", "ap_medium", "ap_hard", "map50"} <= set(metrics["cuda"])
    for name, value in metrics["cpu"].items():
        if isinstance(value, float) and math.isfinite(value):
            assert metrics["cuda"][name] == pytest.approx(value, abs=0.02), name


def test_export_the_weights_a_gpu_trained(trained, tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package, reason=f"ONNX export needs {package}, which this machine lacks")
    weights, _ = trained
    assert export_weights(ExportRequest(str(weights), out=str(tmp_path / "model.onnx")))
    assert (tmp_path / "model.onnx").stat().st_size > 100_000
