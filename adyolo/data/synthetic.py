"""The embedded synthetic datasets: deterministic faces with exact boxes and landmarks.

Two presets (`data.synthetic.preset`): `default`, described here, and `hard`
(`adyolo.data.synthetic_hard`: crowds of 3-16 px faces, blurred, occluded, badly lit, compressed, at
odd poses). In the default, each image is a cluttered background with faces of many sizes
(log-uniform, down to a few pixels, the range the stride-4 head exists for): a skin-toned ellipse,
rotated a little, with eyes, a nose and a mouth whose corners are the five landmarks. Image `i` of a
split depends only on (seed, split, i), so any machine produces the same files. They are written in the
same layout and label format as real data (`images/*.jpg`, `labels/*.txt`), so everything downstream is
exercised unchanged. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from adyolo.data.attributes import attribute_path_for, write_attribute_file
from adyolo.data.canvas import SKIN_TONES_BGR, background, overlap, rotated_half_extent
from adyolo.data.faces import Faces
from adyolo.data.labels import write_label_file
from adyolo.data.synthetic_hard import HARD_GENERATOR_VERSION, render_hard_image
from adyolo.schema import ConfigError

# Bump when the renderer changes, so cached datasets are regenerated.
GENERATOR_VERSION = 1
DEFAULT_JPEG_QUALITY = 92


@dataclass
class SyntheticConfig:
    preset: Literal["default", "hard"] = "default"
    """`default`: 1-10 faces of 6-128 px per image (the settings below). `hard`: crowds of tens to a few
    hundred mostly 3-16 px faces, degraded as in WIDER FACE's hard split, with per-face attribute files;
    it uses num_train, num_val, image_size and seed, and ignores min_faces, max_faces, min_face, max_face."""
    num_train: int = 400
    """Training images."""
    num_val: int = 100
    """Validation images."""
    image_size: int = 320
    """Longer side of the canvas in pixels; the shorter side is 75-100% of it."""
    min_faces: int = 1
    max_faces: int = 10
    """Faces per image, uniform in [min_faces, max_faces]."""
    min_face: float = 6.0
    max_face: float = 128.0
    """Face width in pixels, log-uniform in [min_face, max_face]."""
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("num_train", "num_val"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"{getattr(self, key)} must be at least 1")
        if self.image_size < 64:
            raise ConfigError("image_size", f"{self.image_size} is too small; use 64 or more")
        if self.preset != "default":
            return  # the hard preset chooses its own face counts and sizes
        if not 1 <= self.min_faces <= self.max_faces:
            raise ConfigError("max_faces", f"need 1 <= min_faces ({self.min_faces}) <= max_faces ({self.max_faces})")
        if not 2 <= self.min_face <= self.max_face <= self.image_size / 2:
            raise ConfigError(
                "max_face", f"need 2 <= min_face ({self.min_face}) <= max_face ({self.max_face}) <= image_size / 2"
            )


def ensure_synthetic_dataset(root: str | Path, cfg: SyntheticConfig) -> dict[str, Path]:
    """Generate the dataset under `root` unless an identical one is already there.

    Returns {"train": root/train/images, "val": root/val/images}. Writing happens in a temporary
    folder renamed into place at the end, so an interrupted run never leaves a half dataset that
    looks complete.
    """
    root = Path(root)
    manifest = {"generator_version": GENERATOR_VERSION, **asdict(cfg)}
    if cfg.preset == "default":
        # The manifest the default had before presets existed: its generated datasets stay valid.
        del manifest["preset"]
    else:
        manifest["generator_version"] = f"{cfg.preset}-{HARD_GENERATOR_VERSION}"
    splits = {"train": root / "train" / "images", "val": root / "val" / "images"}
    manifest_path = root / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return splits
    staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    samples = [
        (split, index) for split, count in (("train", cfg.num_train), ("val", cfg.num_val)) for index in range(count)
    ]
    for split in ("train", "val"):
        (staging / split / "images").mkdir(parents=True)
        (staging / split / "labels").mkdir(parents=True)
    # Every image has its own random stream, so threads write the same files as one loop; NumPy's
    # generators and OpenCV release the GIL (500 images: 4.9 s in one thread on a 2-core VM).
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda sample: _write_sample(cfg, staging, *sample), samples))
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, root)
    return splits


def _write_sample(cfg: SyntheticConfig, staging: Path, split: str, index: int) -> None:
    image_path = staging / split / "images" / f"{index:06d}.jpg"
    if cfg.preset == "hard":
        image, faces, attributes, quality = render_hard_image(cfg.image_size, cfg.seed, split, index)
        write_attribute_file(attribute_path_for(image_path), attributes)
    else:
        (image, faces), quality = render_image(cfg, split, index), DEFAULT_JPEG_QUALITY
    cv2.imwrite(str(image_path), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    h, w = image.shape[:2]
    write_label_file(staging / split / "labels" / f"{index:06d}.txt", faces_to_labels(faces, w, h))


def faces_to_labels(faces: Faces, width: int, height: int) -> np.ndarray:
    """Pixels -> normalised label rows [N, 15] (the inverse of Faces.from_labels)."""
    targets = faces.to_targets()
    scale = np.array([width, height] * 7, np.float32)
    labels = targets.copy()
    labels[:, 1:] = targets[:, 1:] / scale
    labels[:, 5:][targets[:, 5:] < 0] = -1
    return labels


def render_image(cfg: SyntheticConfig, split: str, index: int) -> tuple[np.ndarray, Faces]:
    """Image `index` of `split`: BGR uint8 [H, W, 3] and its faces in pixels."""
    if cfg.preset == "hard":
        image, faces, _, _ = render_hard_image(cfg.image_size, cfg.seed, split, index)
        return image, faces
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, index])
    width = cfg.image_size
    height = int(round(cfg.image_size * rng.uniform(0.75, 1.0)))
    if rng.random() < 0.5:
        width, height = height, width
    image = background(rng, width, height)
    placed: list[np.ndarray] = []
    faces = []
    for _ in range(int(rng.integers(cfg.min_faces, cfg.max_faces + 1))):
        for _attempt in range(20):
            face_w = math.exp(rng.uniform(math.log(cfg.min_face), math.log(cfg.max_face)))
            face_h = face_w * rng.uniform(1.15, 1.35)
            angle = rng.uniform(-20, 20)
            half = rotated_half_extent(face_w / 2, face_h / 2, angle)
            if 2 * half[0] >= width or 2 * half[1] >= height:
                continue
            centre = np.array([rng.uniform(half[0], width - half[0]), rng.uniform(half[1], height - half[1])])
            box = np.concatenate([centre - half, centre + half])
            if all(overlap(box, other) < 0.05 for other in placed):
                placed.append(box)
                faces.append(_draw_face(image, rng, centre, face_w, face_h, angle, box))
                break
    return image, Faces.concat(faces)


def _draw_face(image, rng, centre, face_w, face_h, angle, box) -> Faces:
    """Draw one face and return it with its five landmarks (rotated with the face)."""
    skin = SKIN_TONES_BGR[rng.integers(len(SKIN_TONES_BGR))] * rng.uniform(0.85, 1.1)
    skin = tuple(float(c) for c in np.clip(skin, 0, 255))
    dark = tuple(float(c) for c in np.array(skin) * 0.25)
    # Landmarks in the face's own frame (fractions of width / height from the centre).
    local = np.array([[-0.2, -0.1], [0.2, -0.1], [0.0, 0.1], [-0.17, 0.27], [0.17, 0.27]], np.float64) * [
        face_w,
        face_h,
    ]
    local[:, 0] += rng.uniform(-0.03, 0.03) * face_w  # slight asymmetry
    theta = math.radians(angle)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = local @ rotation.T + centre

    def pt(p):
        return int(round(p[0] * 16)), int(round(p[1] * 16))  # cv2 fixed point, 4 fractional bits

    # Hair as a darker, slightly larger ellipse behind the top of the face.
    hair = tuple(float(c) for c in rng.uniform(10, 90, 3))
    cv2.ellipse(
        image,
        pt(centre - rotation @ [0, 0.08 * face_h]),
        (int(face_w * 8.6), int(face_h * 8.4)),
        angle,
        180,
        360,
        hair,
        -1,
        cv2.LINE_AA,
        4,
    )
    cv2.ellipse(image, pt(centre), (int(face_w * 8), int(face_h * 8)), angle, 0, 360, skin, -1, cv2.LINE_AA, 4)
    eye = max(1, int(face_w * 0.07 * 16))
    for p in points[:2]:
        cv2.circle(image, pt(p), int(eye * 1.6), (235, 235, 235), -1, cv2.LINE_AA, 4)
        cv2.circle(image, pt(p), eye, dark, -1, cv2.LINE_AA, 4)
    nose_w = max(1, int(face_w * 0.05 * 16))
    cv2.circle(image, pt(points[2]), nose_w, tuple(c * 0.7 for c in skin), -1, cv2.LINE_AA, 4)
    lips = (60.0, 60.0, float(rng.uniform(140, 200)))
    thickness = max(1, int(round(face_w * 0.05)))
    mid = (points[3] + points[4]) / 2 + rotation @ [0, 0.05 * face_h]
    cv2.polylines(image, [np.array([pt(points[3]), pt(mid), pt(points[4])])], False, lips, thickness, cv2.LINE_AA, 4)
    return Faces(np.zeros(1, np.int64), box[None].astype(np.float32), points[None].astype(np.float32))
