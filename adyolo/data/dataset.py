"""Face dataset: images + YOLO-face labels -> augmented, fixed-size training samples.

A sample is a dict:
    image      uint8 [3, S, S] RGB (S = img_size); the network input is image / 255
    targets    float32 [N, 15] `LabelRow`: class, cx, cy, w, h, 5 x (x, y) in pixels of `image`; -1 = missing point
    index      the item asked for
    skipped    indices of the unreadable images replaced while building this sample (each warned about once)
    letterbox  (ratio, pad_x, pad_y): original = (sample - pad) / ratio; (1, 0, 0) for mosaics
    path       the image file

Augmentation randomness is drawn from a generator seeded by (seed, epoch, index): a sample is the
same whichever worker builds it and however many workers there are, which keeps runs and resumed
runs reproducible.
"""

from __future__ import annotations

import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import psutil
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
from adyolo.failures import InputError
from adyolo.layout import LabelRow

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


class Resized(NamedTuple):
    """An image resized to long side `img_size` (BGR uint8 [h, w, 3]), its faces in those pixels, and
    ratio = resized / original size."""

    image: np.ndarray
    faces: Faces
    ratio: float


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
        self.epochs: int | None = None  # the run's length, for augment.close_mosaic
        # All labels are read up front: a malformed line stops the run before any training step, and
        # what was dropped is counted for the run's start (`summary`).
        self.labels: list[np.ndarray] = []
        self.label_files = 0  # label files found (an image without one has no faces)
        self.skipped_label_lines = 0  # malformed lines skipped under skip_bad_labels
        self.dropped_boxes = 0  # boxes of no size, or wholly outside the image
        for path in self.image_paths:
            label_path = label_path_for(path)
            self.label_files += label_path.is_file()
            parsed = read_label_file(label_path, skip_bad_labels)
            keep = usable_boxes(parsed.labels)
            self.labels.append(parsed.labels[keep])
            self.skipped_label_lines += len(parsed.skipped_lines)
            self.dropped_boxes += int((~keep).sum())
        self.faces = sum(len(labels) for labels in self.labels)
        self._warned: set[Path] = set()
        self._cache: list[Resized | None] | None = None  # `cache_images`

    def cache_images(self) -> None:
        """Decode and resize every image now, once (`data.cache`): a mosaic reads four per sample, and
        decoding + resizing was over half of a sample's time. Call it in the training process before the
        loader's workers start, so that they share the cache (fork) instead of each filling its own copy
        every epoch, and after the run's checks: it reads every image."""
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # OpenCV releases the GIL
            cache = list(pool.map(self._load, range(len(self))))
        for entry in cache:
            if entry is not None:  # shared by every sample: augmentation must copy, never write
                entry.image.flags.writeable = False
        self._cache = cache

    def summary(self) -> str:
        """What was read, and what was dropped: e.g. `16 images, 16 label files, 41 faces`."""
        text = f"{len(self)} images, {self.label_files} label files, {self.faces} faces"
        if self.skipped_label_lines:
            text += f", {self.skipped_label_lines} malformed label lines skipped"
        if self.dropped_boxes:
            text += f", {self.dropped_boxes} boxes dropped (no size, or outside the image)"
        return text

    def __len__(self) -> int:
        return len(self.image_paths)

    def set_epoch(self, epoch: int, epochs: int | None = None) -> None:
        """Draw new augmentations; call before creating the epoch's DataLoader iterator. Once told the
        run's length `epochs`, the last `augment.close_mosaic` epochs build no mosaics. (Accelerate's
        prepared loader calls this again with the epoch alone as it starts iterating; the length stays.)"""
        self.epoch = epoch
        if epochs is not None:
            self.epochs = epochs

    def mosaic_probability(self) -> float:
        """This epoch's chance of a mosaic sample: 0 without augmentation and in the closing epochs."""
        if self.augment is None:
            return 0.0
        if self.epochs is not None and self.epoch >= self.epochs - self.augment.close_mosaic:
            return 0.0
        return self.augment.mosaic

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        size = self.img_size
        # The draw is made in every epoch, mosaic or not, so that closing mosaic changes nothing else.
        if self.augment is not None and rng.random() < self.mosaic_probability():
            tiles, skipped = [], []
            for i in [index, *rng.integers(0, len(self), 3)]:
                loaded, _, bad = self._read(int(i))
                tiles.append((loaded.image, loaded.faces))
                skipped += bad
            image, faces = mosaic(tiles, rng, self.augment, size)
            path = self.image_paths[index]
            letterbox_info = (1.0, 0.0, 0.0)
        else:
            loaded, path, skipped = self._read(index)
            # The image is resized already: letterbox only pads; the ratio is the resize's.
            image, faces, (_, pad_x, pad_y) = letterbox(loaded.image, loaded.faces, size)
            letterbox_info = (loaded.ratio, pad_x, pad_y)
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

    def _load(self, index: int) -> Resized | None:
        """Image `index` resized to long side `img_size` with its faces, or None when unreadable."""
        image = read_image(self.image_paths[index])
        if image is None:
            return None
        h, w = image.shape[:2]
        # Boxes that reach outside the image are clipped; those left smaller than a pixel dropped.
        faces = Faces.from_labels(self.labels[index], w, h).clipped(w, h, min_size=1.0)
        resized, faces = resize_long_side(image, faces, self.img_size)
        return Resized(resized, faces, resized.shape[1] / w)

    def _read(self, index: int) -> tuple[Resized, Path, list[int]]:
        """Image `index` (resized, with its faces), its path, and the indices of unreadable images met on
        the way: an unreadable image (missing, empty, corrupt, a truncated JPEG) is replaced by the next
        readable one."""
        bad = []
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            path = self.image_paths[i]
            loaded = self._cache[i] if self._cache is not None else self._load(i)
            if loaded is None:
                bad.append(i)
                if path not in self._warned:
                    self._warned.add(path)
                    logger.warning("skipping unreadable image %s (missing, empty, corrupt or truncated)", path)
                continue
            return loaded, path, bad
        raise RuntimeError(f"none of the {len(self)} images can be read (first: {self.image_paths[0]})")


JPEG_END = b"\xff\xd9"  # the End Of Image marker; absent from a truncated file's last bytes


def read_image(path: Path) -> np.ndarray | None:
    """BGR uint8 image, or None when missing, empty, not decodable or a truncated JPEG (which OpenCV
    would decode with its missing part grey)."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None
    if not data.size:
        return None
    if path.suffix.lower() in (".jpg", ".jpeg") and JPEG_END not in data[-1024:].tobytes():
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def usable_boxes(labels: np.ndarray) -> np.ndarray:
    """[N] bool: label rows (normalised `LabelRow`) whose box has a size and overlaps the image."""
    centre, size = labels[:, LabelRow.CENTRE], labels[:, LabelRow.SIZE]
    low, high = np.clip(centre - size / 2, 0, 1), np.clip(centre + size / 2, 0, 1)
    return (size > 0).all(axis=1) & (high > low).all(axis=1)


def _worker_init(worker_id: int) -> None:
    # OpenCV's own thread pool in every worker oversubscribes the cores.
    cv2.setNumThreads(0)
    # Ctrl-C reaches every process of the terminal: the trainer finishes its step and saves on the first,
    # and needs its workers for the rest of that step. They end with the loader (or their parent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(
    dataset: FaceDataset,
    batch_size: int | None,
    shuffle: bool,
    workers: int,
    seed: int,
    drop_last: bool = False,
    batch_sampler: torch.utils.data.Sampler[list[int]] | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset`; sharding across ranks is left to the engine (a `batch_sampler` that
    yields this rank's batches replaces batch_size, shuffle and drop_last)."""
    batching = (
        {"batch_sampler": batch_sampler}
        if batch_sampler is not None
        else {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last}
    )
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_worker_init if workers else None,
        **batching,
    )


def build_datasets(cfg: DataConfig, img_size: int, seed: int, cache_copies: int = 1) -> tuple[FaceDataset, FaceDataset]:
    """(train, val) datasets for a DataConfig; the synthetic default is generated on first use.
    `cache_copies`: the processes on this machine that each cache the images (with `cfg.cache`).
    Raises `InputError` naming the key when a folder or list holds no images, or a label line is malformed."""
    if cfg.train is None:
        splits = ensure_synthetic_dataset(cfg.synthetic_root, cfg.synthetic)
        sources = {"train": splits["train"], "val": splits["val"]}
    else:
        sources = {"train": cfg.train, "val": cfg.val}
    images = {}
    for split, source in sources.items():
        try:
            images[split] = list_images(source)
        except FileNotFoundError as err:
            raise InputError(f"data.{split}: {err}") from None
    if cfg.cache:
        check_cache_fits(sum(map(len, images.values())), img_size, cache_copies)
    datasets = []
    for split, paths in images.items():
        augment = cfg.augment if split == "train" else None
        try:
            datasets.append(FaceDataset(paths, img_size, augment, cfg.skip_bad_labels, seed))
        except LabelError as err:
            raise InputError(f"data.{split}: {err}") from None
    return datasets[0], datasets[1]


def check_cache_fits(images: int, img_size: int, copies: int = 1) -> None:
    """Stop (`InputError`) before caching images that could not fit in the RAM available now; `copies`:
    the processes on this machine that each cache them (the ranks of a node)."""
    need = images * img_size * img_size * 3 * copies  # the most: every image's long side is img_size
    available = psutil.virtual_memory().available
    if need > available:
        each = f" ({copies} ranks on this machine, a copy each)" if copies > 1 else ""
        raise InputError(
            f"data.cache: {images} images at {img_size} px may need {need / 2**30:.1f} GiB of RAM{each} and "
            f"{available / 2**30:.1f} GiB are available; set data.cache=false (images are then read as needed)"
        )


def check_datasets(train: FaceDataset, val: FaceDataset, global_batch: int) -> None:
    """Stop (`InputError`) on data that would train on nothing or never be measured."""
    for split, dataset in (("train", train), ("val", val)):
        if not dataset.label_files:
            expected = label_path_for(dataset.image_paths[0])
            raise InputError(
                f"data.{split}: none of its {len(dataset)} images has a label file (for "
                f"{dataset.image_paths[0]} it would be {expected}); put labels in a 'labels' folder beside "
                f"'images' (same sub-folders and names, .txt), or a .txt beside each image"
            )
        if not dataset.faces:
            raise InputError(
                f"data.{split}: its {dataset.label_files} label files hold no faces"
                + (f" ({dataset.summary()})" if dataset.dropped_boxes or dataset.skipped_label_lines else "")
                + ("; nothing to learn from" if split == "train" else "; AP cannot be measured")
            )
    if len(train) < global_batch:
        raise InputError(
            f"data.train has {len(train)} images, fewer than train.global_batch={global_batch}: an epoch "
            f"would have no training step; lower train.global_batch or add images"
        )


__all__ = ["FaceDataset", "LabelError", "build_datasets", "build_loader", "check_datasets", "list_images"]
