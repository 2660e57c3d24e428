"""Dataset behaviour: synthetic default, determinism, bad images and labels, batch layout."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch

from adyolo.data.batch import collate
from adyolo.data.dataset import FaceDataset, build_loader, check_cache_fits, list_images
from adyolo.data.labels import LabelError, label_path_for, read_label_file
from adyolo.data.synthetic import SyntheticConfig, ensure_synthetic_dataset, render_image
from adyolo.data.transforms import AugmentConfig
from adyolo.failures import InputError

SMALL = SyntheticConfig(num_train=12, num_val=4, image_size=128, max_face=48)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", SMALL)


def test_synthetic_is_deterministic_and_has_tiny_faces():
    a_image, a_faces = render_image(SMALL, "train", 3)
    b_image, b_faces = render_image(SMALL, "train", 3)
    assert np.array_equal(a_image, b_image) and np.array_equal(a_faces.boxes, b_faces.boxes)
    assert not np.array_equal(render_image(SMALL, "val", 3)[0], a_image)
    widths = np.concatenate([np.diff(render_image(SyntheticConfig(), "train", i)[1].boxes[:, ::2]) for i in range(20)])
    assert widths.min() < 16 and widths.max() > 64


def test_synthetic_dataset_on_disk_round_trips(synthetic, tmp_path):
    images = list_images(synthetic["train"])
    assert len(images) == SMALL.num_train and len(list_images(synthetic["val"])) == SMALL.num_val
    labels = read_label_file(label_path_for(images[0])).labels
    image, faces = render_image(SMALL, "train", 0)
    h, w = image.shape[:2]
    np.testing.assert_allclose(labels[:, 1:3] * [w, h], (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2, atol=1e-2)
    mtime = images[0].stat().st_mtime_ns
    ensure_synthetic_dataset(synthetic["train"].parents[1], SMALL)  # unchanged settings: reused
    assert images[0].stat().st_mtime_ns == mtime


def test_samples_are_reproducible_per_index_and_epoch(synthetic):
    ds = FaceDataset(list_images(synthetic["train"]), 96, AugmentConfig(), seed=1)
    a, b = ds[5], ds[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["targets"], b["targets"])
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["image"], a["image"])


def test_close_mosaic_trains_the_last_epochs_on_whole_images(synthetic):
    images = list_images(synthetic["train"])
    closing = FaceDataset(images, 96, AugmentConfig(close_mosaic=2), seed=1)
    always = FaceDataset(images, 96, AugmentConfig(), seed=1)
    for epoch in range(5):
        closing.set_epoch(epoch, epochs=5)
        closing.set_epoch(epoch)  # as Accelerate's prepared loader does when it starts iterating
        always.set_epoch(epoch, epochs=5)
        # A mosaic's sample has no letterbox of its own: (1, 0, 0).
        mosaics = [closing[i]["letterbox"] == (1.0, 0.0, 0.0) for i in range(len(closing))]
        if epoch < 3:  # before the last two epochs nothing differs from a run without close_mosaic
            assert all(mosaics)
            assert all(torch.equal(closing[i]["image"], always[i]["image"]) for i in range(len(closing)))
        else:
            assert not any(mosaics)
            assert all(always[i]["letterbox"] == (1.0, 0.0, 0.0) for i in range(len(always)))
    unknown_length = FaceDataset(images, 96, AugmentConfig(close_mosaic=2), seed=1)
    unknown_length.set_epoch(4)  # e.g. the loader benchmark: mosaic stays on
    assert unknown_length[0]["letterbox"] == (1.0, 0.0, 0.0)


def test_cached_images_give_the_same_samples(synthetic, tmp_path):
    images = list_images(synthetic["train"])
    for augment in (AugmentConfig(), AugmentConfig(mosaic=0.0), None):  # mosaics, single images, validation
        plain = FaceDataset(images, 96, augment, seed=2)
        cached = FaceDataset(images, 96, augment, seed=2)
        cached.cache_images()
        for epoch in range(2):
            plain.set_epoch(epoch)
            cached.set_epoch(epoch)
            for i in range(len(plain)):
                a, b = plain[i], cached[i]
                assert torch.equal(a["image"], b["image"]) and torch.equal(a["targets"], b["targets"])
                assert a["letterbox"] == b["letterbox"]
    # The cache is read-only: an augmentation that wrote into it would change later samples.
    assert not cached._cache[0].image.flags.writeable
    # Read at the start: a file deleted later does not matter.
    copies = tmp_path / "images"
    copies.mkdir()
    for path in images[:4]:
        (copies / path.name).write_bytes(path.read_bytes())
        (tmp_path / "labels").mkdir(exist_ok=True)
        (tmp_path / "labels" / f"{path.stem}.txt").write_bytes(label_path_for(path).read_bytes())
    cached = FaceDataset(list_images(copies), 96, seed=2)
    cached.cache_images()
    expected = cached[1]["image"]
    next(copies.glob("*")).unlink()
    assert torch.equal(cached[1]["image"], expected) and not cached[0]["skipped"]


def test_a_cache_larger_than_the_free_ram_stops_before_reading():
    need = r"^data.cache: 10000000 images at 640 px may need 11444.1 GiB .* set data.cache=false"
    with pytest.raises(InputError, match=need):
        check_cache_fits(10_000_000, 640)
    check_cache_fits(100, 64)


def test_loader_batches_are_the_same_with_or_without_workers(synthetic):
    ds = FaceDataset(list_images(synthetic["train"]), 96, AugmentConfig(), seed=0)
    serial = [b["targets"] for b in build_loader(ds, 4, True, workers=0, seed=0)]
    parallel = [b["targets"] for b in build_loader(ds, 4, True, workers=2, seed=0)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(serial) == 3


def test_collate_layout(synthetic):
    ds = FaceDataset(list_images(synthetic["val"]), 128)
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 3, 128, 128) and batch["images"].dtype == torch.uint8
    targets = batch["targets"]
    assert targets.shape[1] == 16
    assert set(targets[:, 0].long().tolist()) <= {0, 1, 2}
    assert len(targets) == sum(len(ds[i]["targets"]) for i in range(3))
    boxes = targets[:, 2:6]
    assert (boxes[:, 2:] > 0).all() and torch.isfinite(targets).all()


def _write_image(path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size[1], size[0], 3), 128, np.uint8))


def test_unreadable_images_are_skipped_warned_and_counted(tmp_path, caplog):
    root = tmp_path / "images"
    for name in ("a", "c"):
        _write_image(root / f"{name}.jpg")
    (root / "b.jpg").write_bytes(b"not a jpeg")  # corrupt
    (root / "d.jpg").write_bytes(b"")  # empty
    whole = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[1].tobytes()
    (root / "e.jpg").write_bytes(whole[: len(whole) // 2])  # truncated: OpenCV alone would fill it grey
    ds = FaceDataset(list_images(root), 64)
    with caplog.at_level(logging.WARNING):
        batch = collate([ds[i] for i in range(5)])
        collate([ds[1]])
    # Each time an unreadable file is met, its index (d.jpg's replacement meets e.jpg, then e.jpg's own
    # read): the trainer counts distinct files.
    assert batch["skipped"] == [1, 3, 4, 4]
    assert batch["images"].shape == (5, 3, 64, 64)
    warnings = [r.getMessage() for r in caplog.records]
    assert [sum(f"{n}.jpg" in w for w in warnings) for n in "bde"] == [1, 1, 1]


def test_malformed_label_names_file_and_line(tmp_path):
    _write_image(tmp_path / "images" / "x.jpg")
    label = tmp_path / "labels" / "x.txt"
    label.parent.mkdir()
    label.write_text("0 0.5 0.5 0.2 0.2\n0 0.5 oops 0.2 0.2\n")
    with pytest.raises(LabelError, match=rf"{label}:2: not a number.*skip_bad_labels"):
        FaceDataset(list_images(tmp_path / "images"), 64)
    ds = FaceDataset(list_images(tmp_path / "images"), 64, skip_bad_labels=True)
    assert ds.skipped_label_lines == 1 and len(ds[0]["targets"]) == 1


def test_degenerate_boxes_are_dropped_or_clipped_and_empty_images_are_valid(tmp_path):
    _write_image(tmp_path / "images" / "x.jpg", (64, 64))
    _write_image(tmp_path / "images" / "empty.jpg", (64, 64))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "x.txt").write_text(
        "0 0.5 0.5 0 0.2\n"  # zero width: dropped
        "0 0.5 0.5 -0.1 0.2\n"  # negative width: dropped
        "0 0.95 0.5 0.3 0.2\n"  # crosses the right edge: clipped
        "0 1.3 0.5 0.2 0.2\n"  # wholly outside: dropped
    )
    ds = FaceDataset(list_images(tmp_path / "images"), 64)
    assert (ds.label_files, ds.faces, ds.dropped_boxes) == (1, 1, 3)
    assert ds.summary() == "2 images, 1 label files, 1 faces, 3 boxes dropped (no size, or outside the image)"
    empty, faces = ds[0], ds[1]
    assert empty["targets"].shape == (0, 15)
    assert len(faces["targets"]) == 1
    cx, w = faces["targets"][0, 1].item(), faces["targets"][0, 3].item()
    assert cx + w / 2 == pytest.approx(64, abs=1e-3) and torch.isfinite(faces["targets"]).all()
