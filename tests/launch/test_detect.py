"""Detection with trained weights (`adyolo.predict.job`, what launch/detect.py runs) on the trained tiny
detector: a folder (with a corrupt file), a video, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from adyolo.predict.detector import Detector
from adyolo.predict.job import DetectionRequest, InputError, detect
from adyolo.weights import load_weights
from tests.engine.runs import ROOT, environment

from .helpers import read, val_images

CONF = 0.01


@pytest.fixture(scope="module")
def detector(trained_run) -> Detector:
    model, config = load_weights(trained_run / "best.pt")
    return Detector(model, config["model"]["img_size"], CONF)


def request(weights, source, out, **settings) -> DetectionRequest:
    return DetectionRequest(str(weights), str(source), out=str(out), conf=CONF, batch=2, **settings)


def boxes_and_points(record: dict) -> np.ndarray:
    """JSON detections -> [K, 15] x1 y1 x2 y2 score + 10 landmark coordinates."""
    rows = [[*d["box"], d["score"], *np.ravel(d["landmarks"])] for d in record["detections"]]
    return np.array(rows, np.float64).reshape(-1, 15)


def test_folder_writes_pictures_and_json_in_original_pixels(trained_run, detector, tmp_path, capsys):
    source = tmp_path / "photos"
    (source / "sub").mkdir(parents=True)
    originals = sorted(val_images(trained_run).glob("*.jpg"))[:3]
    for i, path in enumerate(originals):
        scale = 1 + i  # different sizes in one batch: 128, 256 and 384 px wide
        image = read(path)
        cv2.imwrite(str(source / "sub" / f"{i}.png"), cv2.resize(image, None, fx=scale, fy=scale))
    (source / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert detect(request(trained_run / "best.pt", source, out, device="cpu")) == out / "detections.json"
    printed = capsys.readouterr()
    assert "skipping unreadable image" in printed.err
    # A line per image (its number among the 4 files, path, size, faces, time) and the speed per stage.
    lines = printed.out.splitlines()
    numbers = set()
    for i, line in enumerate(lines[:3]):
        height, width = read(source / "sub" / f"{i}.png").shape[:2]
        found = re.fullmatch(rf"image (\d)/4 {source}/sub/{i}\.png: {width}x{height}, \d+ faces?, [\d.]+ ms", line)
        assert found, lines
        numbers.add(int(found.group(1)))
    assert len(numbers) == 3 and numbers < {1, 2, 3, 4}
    speed = r"speed: [\d.]+ ms pre-process, [\d.]+ ms network \+ NMS, [\d.]+ ms post-process per image"
    assert re.fullmatch(rf"{speed} at 96x96 \(batch 2, cpu\)", lines[-1]), lines
    result = json.loads((out / "detections.json").read_text())
    assert result["skipped"] == [str(source / "broken.jpg")]
    assert [r["path"] for r in result["images"]] == [str(source / "sub" / f"{i}.png") for i in range(3)]
    for record in result["images"]:
        image = read(record["path"])
        assert (record["height"], record["width"]) == image.shape[:2]
        drawn = read(out / "sub" / f"{record['path'][-5]}.png")
        assert drawn.shape == image.shape and not np.array_equal(drawn, image)  # something was drawn
        expected = detector([image])[0][:, :15]
        assert len(expected) > 0
        np.testing.assert_allclose(boxes_and_points(record), expected, atol=0.01)


def test_video_gives_an_annotated_video_and_per_frame_detections(trained_run, detector, tmp_path):
    video = tmp_path / "clip.avi"
    frames = [read(p) for p in sorted(val_images(trained_run).glob("*.jpg"))[:5]]
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (w, h))
    for frame in frames:
        writer.write(cv2.resize(frame, (w, h)))
    writer.release()
    out = tmp_path / "out"
    assert detect(request(trained_run / "best.pt", video, out)) == out / "clip.json"
    result = json.loads((out / "clip.json").read_text())["video"]
    assert (result["width"], result["height"], result["fps"]) == (w, h, 5.0)
    assert [f["frame"] for f in result["frames"]] == list(range(5))
    capture = cv2.VideoCapture(str(video))  # the decoded frames, as detect.py saw them
    decoded = [capture.read()[1] for _ in range(5)]
    for frame, record in zip(decoded, result["frames"]):
        np.testing.assert_allclose(boxes_and_points(record), detector([frame])[0][:, :15], atol=0.01)
    annotated = cv2.VideoCapture(str(out / "clip.mp4"))
    assert annotated.isOpened() and int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == 5


def test_bad_input_stops_before_the_model_runs(trained_run, tmp_path):
    weights = trained_run / "best.pt"
    image = next(val_images(trained_run).glob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"PK\x03\x04 not really")
    cases = {
        "no such weights file": (tmp_path / "missing.pt", image, {}),
        "not a readable adyolo weights file": (foreign, image, {}),
        "broken.jpg: not a readable image": (weights, broken, {}),
        "no images": (weights, empty, {}),
        "no such file or folder": (weights, tmp_path / "nothing.jpg", {}),
        "multiple of the largest stride": (weights, image, {"img": 100}),
    }
    for message, (path, source, settings) in cases.items():
        with pytest.raises(InputError, match=re.escape(message)) as err:
            detect(request(path, source, tmp_path / "out", **settings))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_script_exits_with_code_2_and_one_line(trained_run, tmp_path):
    """Once as a real process: the exit code reaches the shell."""
    weights = tmp_path / "other.pt"
    weights.write_text("{}")
    command = [sys.executable, str(ROOT / "launch" / "detect.py"), "--weights", str(weights), "--source", "x.jpg"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment(), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --source x.jpg: no such file")
