"""Face dataset: images + YOLO-face labels -> augmented, fixed-size training samples.

A sample is a dict:
    image      uint8 [3, S, S] RGB (S = img_size); the network input is image / 255
    targets    float32 [N, 15] `LabelRow`: class, cx, cy, w, h, 5 x (x, y) in pixels of `image`; -1 = missing point
    index      the item asked for
    skipped    unreadable images replaced while building this sample (each warned about once)
    letterbox  (ratio, pad_x, pad_y): original = (sample - pad) / ratio; (1, 0, 0) for mosaics
    path       the image file

Augmentation randomness is drawn from a generator seeded by (seed, epoch, index): a sample is the
same whichever worker builds it and however many workers there are, which keeps runs and resumed
runs reproducible.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from adyolo.data.batch import collate
from adyolo.data.config import DataConfig
from adyolo.data.faces import Faces
from adyolo.data.labels import LabelError, label_path_for, read_label_file
from adyolo.data.synthetic import ensure_synthetic_dataset
from adyolo.data.transforms import (
    AugmentConfig,
    horizontal_flip,
    hsv_jitter,
    letterbox,
    mosaic,
    random_affine,
    resize_long_side,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(source: str | Path) -> list[Path]:
    """Image files of a folder (recursively, sorted), or the paths listed in a .txt file (one per line,
    relative to the list's folder unless absolute)."""
    source = Path(source)
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.is_file() and source.suffix == ".txt":
        lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        images = [p if p.is_absolute() else source.parent / p for p in map(Path, lines)]
    else:
        raise FileNotFoundError(f"{source}: expected a folder of images or a .txt list of image paths")
    if not images:
        raise FileNotFoundError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return images


class FaceDataset(Dataset):
    def __init__(
        self,
        image_paths: list[Path],
        img_size: int,
        augment: AugmentConfig | None = None,
        skip_bad_labels: bool = False,
        seed: int = 0,
    ):
        self.image_paths = [Path(p) for p in image_paths]
        self.img_size = img_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        # All labels are read up front: a malformed line stops the run before any training step.
        self.labels: list[np.ndarray] = []
        self.skipped_label_lines = 0
        for path in self.image_paths:
            parsed = read_label_file(label_path_for(path), skip_bad_labels)
            self.labels.append(parsed.labels)
            self.skipped_label_lines += len(parsed.skipped_lines)
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.image_paths)

    def set_epoch(self, epoch: int) -> None:
        """Draw new augmentations; call before creating the epoch's DataLoader iterator."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        size = self.img_size
        if self.augment is not None and rng.random() < self.augment.mosaic:
            tiles, skipped = [], 0
            for i in [index, *rng.integers(0, len(self), 3)]:
                image, faces, path, bad = self._read(int(i))
                tiles.append(resize_long_side(image, faces, size))
                skipped += bad
            image, faces = mosaic(tiles, rng, self.augment, size)
            path = self.image_paths[index]
            letterbox_info = (1.0, 0.0, 0.0)
        else:
            image, faces, path, skipped = self._read(index)
            image, faces, letterbox_info = letterbox(image, faces, size)
            if self.augment is not None:
                image, faces = random_affine(image, faces, rng, self.augment, (size, size))
        if self.augment is not None:
            image = hsv_jitter(image, rng, self.augment.hsv_h, self.augment.hsv_s, self.augment.hsv_v)
            if rng.random() < self.augment.fliplr:
                image, faces = horizontal_flip(image, faces)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1))),
            "targets": torch.from_numpy(faces.to_targets()),
            "index": index,
            "skipped": skipped,
            "letterbox": letterbox_info,
            "path": str(path),
        }

    def _read(self, index: int) -> tuple[np.ndarray, Faces, Path, int]:
        """Image `index` and its faces; an unreadable image is replaced by the next readable one."""
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            path = self.image_paths[i]
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                if path not in self._warned:
                    self._warned.add(path)
                    logger.warning("skipping unreadable image %s (missing, empty or corrupt)", path)
                continue
            h, w = image.shape[:2]
            # Degenerate boxes (zero size, outside the image) are clipped or dropped here.
            faces = Faces.from_labels(self.labels[i], w, h).clipped(w, h, min_size=1.0)
            return image, faces, path, attempt
        raise RuntimeError(f"none of the {len(self)} images can be read (first: {self.image_paths[0]})")


def _worker_init(worker_id: int) -> None:
    # OpenCV's own thread pool in every worker oversubscribes the cores.
    cv2.setNumThreads(0)


def build_loader(
    dataset: FaceDataset, batch_size: int, shuffle: bool, workers: int, seed: int, drop_last: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset`; sharding across ranks is left to the engine."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_worker_init if workers else None,
    )


def build_datasets(cfg: DataConfig, img_size: int, seed: int) -> tuple[FaceDataset, FaceDataset]:
    """(train, val) datasets for a DataConfig; the synthetic default is generated on first use."""
    if cfg.train is None:
        splits = ensure_synthetic_dataset(cfg.synthetic_root, cfg.synthetic)
        train_source, val_source = splits["train"], splits["val"]
    else:
        train_source, val_source = cfg.train, cfg.val
    train = FaceDataset(list_images(train_source), img_size, cfg.augment, cfg.skip_bad_labels, seed)
    val = FaceDataset(list_images(val_source), img_size, None, cfg.skip_bad_labels, seed)
    return train, val


__all__ = ["FaceDataset", "LabelError", "build_datasets", "build_loader", "list_images"]
