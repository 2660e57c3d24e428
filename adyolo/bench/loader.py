"""Images/s of the training data loader (full augmentation) per worker count."""

from __future__ import annotations

import itertools
import time

from adyolo.data.config import DataConfig
from adyolo.data.dataset import FaceDataset, build_loader, list_images
from adyolo.data.synthetic import ensure_synthetic_dataset

LOADER_BATCH = 16


def bench_loader(
    workers: list[int], cache: list[bool], img: int, batches: int, data: str | None, batch: int = LOADER_BATCH
) -> list[dict]:
    """[{"workers", "cache", "images_per_s"}] for each image cache setting (`data.cache`) and worker count,
    timed after one warm-up batch (worker start-up is not throughput), on `data` (a folder or list of
    images; default: the synthetic training split). Filling the cache is not timed either."""
    cfg = DataConfig()
    source = data or ensure_synthetic_dataset(cfg.synthetic_root, cfg.synthetic)["train"]
    paths, rows = list_images(source), []
    for cached in cache:
        dataset = FaceDataset(paths, img, cfg.augment)
        if cached:
            dataset.cache_images()
        for num_workers in workers:
            loader = build_loader(dataset, batch, shuffle=True, workers=num_workers, seed=0)
            stream = (b for _ in itertools.count() for b in loader)  # epoch after epoch, like training
            next(stream)
            start, images = time.perf_counter(), 0
            for _ in range(batches):
                images += len(next(stream)["images"])
            seconds = time.perf_counter() - start
            rows.append({"workers": num_workers, "cache": cached, "images_per_s": images / seconds})
            del stream, loader
    return rows
