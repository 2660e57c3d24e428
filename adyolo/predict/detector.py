"""Inference on plain images: BGR arrays of any size in, detections in their own pixels out.

The same steps as validation (`adyolo.eval.evaluator.detect_batch`, which `predict` runs): letterbox
to the model's square input, forward, `head.decode`, confidence filter + NMS, then map back to the
original image. What validation gets from the dataset (letterboxing, the ratio and padding) is done
here per image, so `launch/detect.py` only reads files and writes pictures and JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adyolo.data.faces import Faces
from adyolo.data.transforms import letterbox
from adyolo.eval.evaluator import detect_batch
from adyolo.eval.postprocess import unletterbox

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


class Detector:
    """A detector ready for images: `detector([image, ...])` -> per image an array [K, 16] of
    x1, y1, x2, y2, score, 5 x (x, y) landmarks, class, in the input image's pixels, by descending score.

    Images are BGR uint8 [H, W, 3] as `cv2.imread` returns them, of any sizes (a batch may mix them).
    Boxes are clipped to the image; landmarks are not (a point may lie just outside a cut-off face).
    """

    def __init__(
        self,
        model: nn.Module,
        img_size: int,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ):
        stride = max(int(s) for s in model.head.strides.tolist())
        if img_size < stride or img_size % stride:
            raise ValueError(f"image size {img_size} must be a positive multiple of the largest stride ({stride})")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.img_size = img_size
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.autocast_dtype = autocast_dtype

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[float, float, float]]:
        """BGR [H, W, 3] -> (RGB uint8 [3, S, S] letterboxed, (ratio, pad_x, pad_y)), as the val dataset does."""
        boxed, _, info = letterbox(image, Faces.empty(), self.img_size)
        return torch.from_numpy(np.ascontiguousarray(boxed[..., ::-1].transpose(2, 0, 1))), info

    @torch.no_grad()
    def detect_letterboxed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 [B, 3, S, S] RGB network inputs -> per image [K, 16] in those letterboxed pixels (on CPU)."""
        detections = detect_batch(
            self.model, images.to(self.device), self.autocast_dtype, self.conf_threshold, self.iou_threshold
        )
        return [d.cpu() for d in detections]

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not len(images):
            return []
        inputs, infos = zip(*(self.preprocess(image) for image in images))
        results = []
        for dets, (ratio, pad_x, pad_y), image in zip(self.detect_letterboxed(torch.stack(inputs)), infos, images):
            dets = unletterbox(dets, ratio, pad_x, pad_y).numpy()
            h, w = image.shape[:2]
            dets[:, [0, 2]] = dets[:, [0, 2]].clip(0, w)
            dets[:, [1, 3]] = dets[:, [1, 3]].clip(0, h)
            results.append(dets)
        return results


def detections_to_json(detections: np.ndarray) -> list[dict[str, Any]]:
    """[K, 16] detections -> [{"box": [x1, y1, x2, y2], "score": s, "landmarks": [[x, y] x 5], "class": c}]."""
    return [
        {
            "box": [round(float(v), 2) for v in det[:4]],
            "score": round(float(det[4]), 5),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in det[5:15].reshape(5, 2)],
            "class": int(det[15]),
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


def resolve_device(name: str | None) -> torch.device:
    """--device: None -> CUDA when available, else CPU; a CUDA device that is not there is a ValueError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES
