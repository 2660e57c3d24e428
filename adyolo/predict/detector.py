"""Faces in images: the forward, decode and NMS that validation and deployment share, and `Detector`
for BGR images of any size.

`detect_batch` runs letterboxed network inputs through the model, `head.decode` and confidence
filter + NMS; validation (`adyolo.eval.evaluator.predict`) calls it on dataset batches. `Detector`
adds what validation gets from the dataset (letterboxing, and mapping detections back to the original
image), so `launch/detect.py` only reads files and writes pictures and JSON.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adyolo.data.faces import Faces
from adyolo.data.transforms import letterbox
from adyolo.layout import DetectionRow
from adyolo.predict.postprocess import postprocess, unletterbox


@torch.no_grad()
def detect_batch(
    model: nn.Module,
    images: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    conf_threshold: float = 0.02,
    iou_threshold: float = 0.5,
) -> list[torch.Tensor]:
    """uint8 RGB network inputs [B, 3, S, S] on the model's device -> per image [K, 16] (`DetectionRow`) in
    those (letterboxed) pixels. The model's mode is the caller's."""
    amp = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with amp:
        raw = model(images.float() / 255)
    return postprocess(model.head.decode(raw), conf_threshold, iou_threshold)


@dataclass
class Speed:
    """Where a `Detector`'s time went, summed over every call."""

    images: int = 0
    preprocess_s: float = 0.0  # letterbox, BGR -> RGB, stacking
    inference_s: float = 0.0  # forward pass, decode and NMS (on the device)
    postprocess_s: float = 0.0  # back to the original image's pixels, clipping

    def __str__(self) -> str:
        n = max(self.images, 1)
        return (
            f"{1000 * self.preprocess_s / n:.1f} ms pre-process, {1000 * self.inference_s / n:.1f} ms network + NMS, "
            f"{1000 * self.postprocess_s / n:.1f} ms post-process per image"
        )


class Detector:
    """A detector ready for images: `detector([image, ...])` -> per image an array [K, 16] (`DetectionRow`:
    x1, y1, x2, y2, score, 5 x (x, y) landmarks, class) in the input image's pixels, by descending score.

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
        self.speed = Speed()

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
        start = time.perf_counter()
        inputs, infos = zip(*(self.preprocess(image) for image in images))
        batch = torch.stack(inputs)
        letterboxed = time.perf_counter()
        detections = self.detect_letterboxed(batch)  # on CPU again: the device has finished
        detected = time.perf_counter()
        results = []
        for dets, (ratio, pad_x, pad_y), image in zip(detections, infos, images):
            dets = unletterbox(dets, ratio, pad_x, pad_y).numpy()
            h, w = image.shape[:2]
            dets[:, DetectionRow.BOX] = dets[:, DetectionRow.BOX].clip(0, [w, h, w, h])
            results.append(dets)
        self.speed.images += len(images)
        self.speed.preprocess_s += letterboxed - start
        self.speed.inference_s += detected - letterboxed
        self.speed.postprocess_s += time.perf_counter() - detected
        return results


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
