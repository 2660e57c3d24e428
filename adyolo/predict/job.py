"""Detect faces in an image, a folder of images or a video: the work behind `launch/detect.py`.

The source and the weights are checked before the model runs (`InputError`, `WeightsError`). A
folder gives annotated copies under the output folder (same relative paths) and detections.json; a
video gives an annotated .mp4 and a .json with every frame's detections. Detections are in the
original image's pixels.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from adyolo.data.dataset import list_images
from adyolo.layout import NUM_LANDMARKS, DetectionRow
from adyolo.model import fold_batchnorm_
from adyolo.predict.detector import Detector, resolve_device
from adyolo.progress import Progress
from adyolo.viz import draw_detections
from adyolo.weights import load_weights

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
DEFAULT_VIDEO_FPS = 25.0  # some containers do not store their frame rate


class InputError(ValueError):
    """An argument that cannot work (source, weights, device, size); the message says why and what to pass."""


@dataclass
class DetectionRequest:
    """What `launch/detect.py` asks for (its flags, same names)."""

    weights: str
    source: str
    out: str | None = None  # None: runs/detect/<source name>
    img: int | None = None  # None: the size the weights were trained at
    conf: float = 0.25
    iou: float = 0.5
    device: str | None = None  # None: CUDA when available, else CPU
    batch: int = 8


@torch.no_grad()
def detect(request: DetectionRequest) -> Path:
    """Run `request`; returns the JSON file written. Raises InputError for bad input before the model runs."""
    if request.batch < 1:
        raise InputError(f"--batch {request.batch}: must be at least 1")
    kind, paths = check_source(request.source)
    try:
        device = resolve_device(request.device)
        model, config = load_weights(request.weights, device)
        fold_batchnorm_(model)  # inference only: one convolution per Conv-BN pair, same outputs up to rounding
        img_size = request.img or config["model"]["img_size"]
        detector = Detector(model, img_size, request.conf, request.iou, device)
    except ValueError as err:  # WeightsError, a device that is not there, a size the model cannot take
        raise InputError(str(err)) from None
    source = Path(request.source)
    out = Path(request.out) if request.out else Path("runs") / "detect" / (source.stem or "source")
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "weights": str(request.weights),
        "source": str(source),
        "img_size": img_size,
        "conf": request.conf,
        "iou": request.iou,
    }
    start = time.perf_counter()
    if kind == "video":
        record, video = detect_video(detector, paths[0], out, request.batch)
        json_path = out / f"{source.stem}.json"
        json_path.write_text(json.dumps({**settings, "video": record}, indent=1))
        count = sum(len(f["detections"]) for f in record["frames"])
        seconds = time.perf_counter() - start
        print(f"{len(record['frames'])} frames, {count} faces -> {video}, {json_path} ({seconds:.1f} s)")
        print(f"speed: {detector.speed} at {img_size}x{img_size} (batch {request.batch}, {device})")
        return json_path
    root = source if kind == "folder" else source.parent
    result = detect_images(detector, paths, root, out, request.batch)
    json_path = out / "detections.json"
    json_path.write_text(json.dumps({**settings, **result}, indent=1))
    count = sum(len(r["detections"]) for r in result["images"])
    skipped = f", {len(result['skipped'])} unreadable skipped" if result["skipped"] else ""
    seconds = time.perf_counter() - start
    print(f"{len(result['images'])} images, {count} faces{skipped} -> {out}/ ({json_path.name}; {seconds:.1f} s)")
    print(f"speed: {detector.speed} at {img_size}x{img_size} (batch {request.batch}, {device})")
    return json_path


def check_source(source: str) -> tuple[str, list[Path]]:
    """-> (kind: image | folder | video, the files); raises InputError for a source that cannot work."""
    path = Path(source)
    if not path.exists():
        raise InputError(f"--source {source}: no such file or folder; pass an image, a folder of images or a video")
    if path.is_dir():
        try:
            return "folder", list_images(path)
        except FileNotFoundError as err:
            raise InputError(f"--source {err}; pass a folder that holds images") from None
    if is_video(path):
        capture = cv2.VideoCapture(str(path))
        readable = capture.isOpened() and capture.read()[0]
        capture.release()
        if not readable:
            raise InputError(f"--source {source}: cannot read a frame of this video (corrupt or unsupported codec)")
        return "video", [path]
    if cv2.imread(str(path), cv2.IMREAD_COLOR) is None:
        raise InputError(f"--source {source}: not a readable image (missing, empty, corrupt or not an image format)")
    return "image", [path]


def detect_images(detector: Detector, paths: list[Path], root: Path, out: Path, batch: int) -> dict:
    """Annotated copies under `out` (same relative paths as under `root`) and the JSON record:
    {"images": [{"path", "width", "height", "detections"}], "skipped": [unreadable paths]}. Prints a line
    per image: its number, path, size, faces found and the time per image of its batch."""
    records, skipped = [], []
    number = {path: i + 1 for i, path in enumerate(paths)}
    for chunk in batched(paths, batch):
        images, kept = [], []
        for path in chunk:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:  # one bad file must not end a long folder run
                print(f"warning: skipping unreadable image {path}", file=sys.stderr)
                skipped.append(str(path))
            else:
                images.append(image)
                kept.append(path)
        start = time.perf_counter()
        found = detector(images)
        per_image_ms = 1000 * (time.perf_counter() - start) / max(len(images), 1)
        for path, image, dets in zip(kept, images, found):
            target = out / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), draw_detections(image, dets))
            height, width = image.shape[:2]
            records.append(
                {"path": str(path), "width": width, "height": height, "detections": detections_to_json(dets)}
            )
            faces = f"{len(dets)} face{'s' if len(dets) != 1 else ''}"
            print(f"image {number[path]}/{len(paths)} {path}: {width}x{height}, {faces}, {per_image_ms:.1f} ms")
    return {"images": records, "skipped": skipped}


def detect_video(detector: Detector, path: Path, out: Path, batch: int) -> tuple[dict, Path]:
    """The annotated video (mp4) and per-frame detections."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_VIDEO_FPS
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    target = out / f"{path.stem}.mp4"
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    frames = []

    def read_frames() -> Iterator[np.ndarray]:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame

    try:
        with Progress(total=total, desc="detect", unit="frame") as bar:
            for chunk in batched(read_frames(), batch):
                for frame, dets in zip(chunk, detector(chunk)):
                    writer.write(draw_detections(frame, dets))
                    frames.append(
                        {
                            "frame": len(frames),
                            "time_s": round(len(frames) / fps, 4),
                            "detections": detections_to_json(dets),
                        }
                    )
                bar.update(len(chunk))
    finally:
        capture.release()
        writer.release()
    record = {"path": str(path), "width": width, "height": height, "fps": fps, "frames": frames}
    return record, target


def detections_to_json(detections: np.ndarray) -> list[dict[str, Any]]:
    """[K, 16] `DetectionRow` -> [{"box": [x1, y1, x2, y2], "score": s, "landmarks": [[x, y] x 5], "class": c}]."""
    return [
        {
            "box": [round(float(v), 2) for v in det[DetectionRow.BOX]],
            "score": round(float(det[DetectionRow.SCORE]), 5),
            "landmarks": [
                [round(float(x), 2), round(float(y), 2)]
                for x, y in det[DetectionRow.LANDMARKS].reshape(NUM_LANDMARKS, 2)
            ],
            "class": int(det[DetectionRow.CLASS]),
        }
        for det in detections
    ]


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter); itertools.batched needs Python 3.12."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES
