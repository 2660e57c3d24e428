"""ONNX export (`adyolo.export`, what launch/export.py runs): ONNX Runtime agrees with PyTorch for both
fusion variants, at the export size and (dynamic) at other batches and sizes; the exported graph gives
the detections that `Detector` gives; bad input stops before anything is exported."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
import torch

from adyolo.export.job import ExportRequest, InputError, export_weights
from adyolo.export.onnx import DEFAULT_TOLERANCE, check_inputs, check_onnx, export_onnx
from adyolo.model import ModelConfig, build_model
from adyolo.predict.detector import Detector
from adyolo.predict.postprocess import postprocess
from adyolo.weights import load_weights

from .helpers import read, val_images


@pytest.mark.slow
def test_trained_weights_export_fixed_and_dynamic_and_detect_like_pytorch(trained_run, tmp_path, capsys):
    weights = trained_run / "best.pt"
    fixed, dynamic = tmp_path / "fixed.onnx", tmp_path / "dynamic.onnx"
    assert export_weights(ExportRequest(str(weights), out=str(fixed)))
    assert export_weights(ExportRequest(str(weights), out=str(dynamic), dynamic=True))
    printed = capsys.readouterr().out
    assert "input images 1x3x96x96" in printed and "input images batchx3xheightxwidth" in printed
    assert printed.count("ok   ") == 2 + 4 and "FAIL" not in printed  # fixed: 2 inputs, dynamic: 4

    # The graph holds the EMA weights of best.pt: after the same letterbox and NMS, ONNX Runtime finds
    # the faces PyTorch finds, at the trained size (fixed) and at 160 px in a batch of 3 (dynamic).
    model, config = load_weights(weights)
    images = [read(p) for p in sorted(val_images(trained_run).glob("*.jpg"))[:3]]
    for path, size, batch in ((fixed, 96, 1), (dynamic, 160, 3)):
        detector = Detector(model, size, conf_threshold=0.01)
        inputs = torch.stack([detector.preprocess(image)[0] for image in images[:batch]])
        expected = detector.detect_letterboxed(inputs)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (decoded,) = session.run(None, {"images": (inputs.float() / 255).numpy()})
        got = postprocess(torch.from_numpy(decoded), conf_threshold=0.01)
        assert sum(len(e) for e in expected) > 0  # the trained detector scores some anchors above 0.01
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            assert_same_detections(g, e, atol=1e-3, rtol=1e-4)  # pixels: 1e-3 px


def assert_same_detections(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """The same detections (`DetectionRow`s), in any order: NMS sorts by score, and two scores equal to
    float noise can come out in either order from two runtimes (seen on an AMD EPYC CPU)."""
    difference = (got[:, None, :] - expected[None, :, :]).abs()
    close = (difference <= atol + rtol * expected[None, :, :].abs()).all(-1)  # [got, expected]
    match = difference.amax(-1).argmin(1)  # each got row's nearest expected row
    assert close[torch.arange(len(got)), match].all(), (got, expected)
    assert sorted(match.tolist()) == list(range(len(expected)))  # one to one


@pytest.mark.slow
def test_full_attention_sdpa_exports_with_dynamic_shapes(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="n", fusion="full", attention="sdpa", img_size=64)).eval()
    report = export_onnx(model, tmp_path / "full.onnx", 64, dynamic=True)
    assert report.input_shape == ["batch", 3, "height", "width"]
    results = check_onnx(model, report.path, check_inputs(1, 64, 64, dynamic=True))
    shapes = [r.input_shape for r in results]
    assert shapes == [(1, 3, 64, 64), (1, 3, 64, 64), (3, 3, 128, 96), (2, 3, 128, 128)]
    assert all(r.passed for r in results), "\n".join(map(str, results))

    # The check is not vacuous: other weights than the exported ones fail it by far.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    (changed,) = check_onnx(model, report.path, check_inputs(1, 64, 64, dynamic=False)[:1])
    assert not changed.passed and changed.max_rel > 10 * DEFAULT_TOLERANCE, changed


def test_raw_maps_export(trained_run, tmp_path, capsys):
    out = tmp_path / "raw.onnx"
    assert export_weights(ExportRequest(str(trained_run / "best.pt"), out=str(out), decode=False))
    assert "outputs p2, p3, p4, p5" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shapes = [o.shape for o in session.run(None, {"images": np.zeros((1, 3, 96, 96), np.float32)})]
    assert shapes == [(1, 3, 96 // s, 96 // s, 16) for s in (4, 8, 16, 32)]


@pytest.mark.slow
def test_yolov5face_baseline_exports_its_three_raw_maps_with_dynamic_shapes(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="n", neck="yolov5face", img_size=64)).eval()
    report = export_onnx(model, tmp_path / "yolov5face.onnx", 64, dynamic=True, decode=False)
    assert report.output_names == ["p3", "p4", "p5"]
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["p3", "p4", "p5"]
    shapes = [o.shape for o in session.run(None, {"images": np.zeros((2, 3, 96, 64), np.float32)})]
    assert shapes == [(2, 3, 96 // s, 64 // s, 16) for s in (8, 16, 32)]
    results = check_onnx(model, report.path, check_inputs(1, 64, 64, dynamic=True), decode=False)
    assert all(r.passed for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize(
    ("make_request", "message"),
    [
        (lambda run, tmp: ExportRequest(str(tmp / "missing.pt")), "missing.pt: no such weights file"),
        (lambda run, tmp: ExportRequest(str(_foreign(tmp))), "not an adyolo weights file"),
        (lambda run, tmp: ExportRequest(str(run / "best.pt"), img=[100]), "--img: image size 100 is not"),
        (lambda run, tmp: ExportRequest(str(run / "best.pt"), img=[32], dynamic=True), "--img: a dynamic export"),
    ],
)
def test_bad_input_stops_before_exporting(trained_run, tmp_path, make_request, message):
    request = make_request(trained_run, tmp_path)
    request.out = str(tmp_path / "never.onnx")
    with pytest.raises(InputError, match=re.escape(message)):
        export_weights(request)
    assert not (tmp_path / "never.onnx").exists()


def _foreign(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    return path
