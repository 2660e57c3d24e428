"""The hard synthetic preset: deterministic, hard in WIDER FACE's hard-split ways, its attribute files aligned
with its labels; and the default preset's images unchanged by it (the default run's AP is a golden)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from adyolo.data.attributes import ATTRIBUTES, attribute_path_for, read_attribute_file
from adyolo.data.dataset import list_images
from adyolo.data.labels import label_path_for, read_label_file
from adyolo.data.synthetic import SyntheticConfig, ensure_synthetic_dataset, render_image
from adyolo.data.synthetic_hard import render_hard_image

COLUMN = {name: i for i, name in enumerate(ATTRIBUTES)}
# sha256 of the default preset's first three train and val images (pixels, boxes, landmarks) as written
# before the hard preset existed: the default run's data, so its golden AP, must not move.
DEFAULT_IMAGES_SHA256 = "34892b7f2c3f66c7568bfc590680face220e8567cea983877bebd6e4cc44e0de"


def test_the_default_preset_draws_what_it_always_drew():
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for index in range(3):
            image, faces = render_image(SyntheticConfig(), split, index)
            for array in (image, faces.boxes, faces.points):
                digest.update(array.tobytes())
    assert digest.hexdigest() == DEFAULT_IMAGES_SHA256


def test_images_depend_only_on_seed_split_and_index():
    first = render_hard_image(256, 0, "train", 5)
    again = render_hard_image(256, 0, "train", 5)
    assert np.array_equal(first[0], again[0]) and first[3] == again[3]
    assert np.array_equal(first[1].boxes, again[1].boxes) and np.array_equal(first[2], again[2])
    assert np.array_equal(first[1].points, again[1].points, equal_nan=True)
    assert not np.array_equal(render_hard_image(256, 0, "val", 5)[0], first[0])
    assert not np.array_equal(render_hard_image(256, 1, "train", 5)[0], first[0])
    image, faces = render_image(SyntheticConfig(preset="hard", image_size=256), "train", 5)
    assert np.array_equal(image, first[0]) and np.array_equal(faces.boxes, first[1].boxes)


@pytest.fixture(scope="module")
def sample():
    """16 images: enough to see every property, 1-2 s to draw."""
    rendered = [render_hard_image(256, 0, "train", i) for i in range(16)]
    counts = np.array([len(faces) for _, faces, _, _ in rendered])
    boxes = np.concatenate([faces.boxes for _, faces, _, _ in rendered])
    points = np.concatenate([faces.points for _, faces, _, _ in rendered])
    attributes = np.concatenate([a for _, _, a, _ in rendered])
    return rendered, counts, boxes, points, attributes


def test_crowds_of_small_faces(sample):
    rendered, counts, boxes, _, attributes = sample
    assert counts.max() >= 150 and np.median(counts) >= 30 and counts.min() >= 1  # tens to a few hundred
    smaller_side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert smaller_side.min() >= 3 and (smaller_side < 16).mean() > 0.8 and (smaller_side < 8).mean() > 0.4
    assert (smaller_side >= 32).any()  # and a few large ones
    for image, faces, _, _ in rendered:  # boxes lie in the image
        height, width = image.shape[:2]
        assert (faces.boxes >= 0).all() and (faces.boxes[:, [2, 3]] <= [width, height]).all()
    assert 0.5 < attributes[:, COLUMN["crowd"]].mean() < 1.0


def test_degraded_occluded_and_turned_faces_are_labelled_as_such(sample):
    rendered, _, _, points, attributes = sample
    for name, values in (("blur", (0, 1, 2)), ("occlusion", (0, 1, 2)), ("illumination", (0, 1)), ("pose", (0, 1))):
        assert set(np.unique(attributes[:, COLUMN[name]])) == set(values), name
    missing = np.isnan(points[..., 0])
    atypical = attributes[:, COLUMN["pose"]] == 1
    occluded = attributes[:, COLUMN["occlusion"]] >= 1
    # Landmarks turned away or covered are missing: far more often on profile and occluded faces.
    assert missing[atypical].any(axis=1).mean() > 2 * missing[~atypical & ~occluded].any(axis=1).mean()
    assert missing[occluded].any(axis=1).mean() > missing[~atypical & ~occluded].any(axis=1).mean()
    brightness = np.array([image.mean() for image, _, _, _ in rendered])
    assert brightness.min() < 50 < brightness.max()  # some images in low light
    qualities = [quality for _, _, _, quality in rendered]
    assert min(qualities) < 30 and max(qualities) <= 70  # JPEG artefacts


def test_the_dataset_on_disk_has_attributes_aligned_with_labels(tmp_path):
    cfg = SyntheticConfig(preset="hard", num_train=3, num_val=2, image_size=128)
    splits = ensure_synthetic_dataset(tmp_path / "hard", cfg)
    manifest = json.loads((tmp_path / "hard" / "manifest.json").read_text())
    assert manifest["preset"] == "hard" and manifest["generator_version"].startswith("hard-")
    for split, count in (("train", 3), ("val", 2)):
        images = list_images(splits[split])
        assert len(images) == count
        for image in images:
            labels = read_label_file(label_path_for(image)).labels
            attributes = read_attribute_file(attribute_path_for(image))
            assert len(labels) == len(attributes) > 0
    # The default preset keeps the manifest it had before presets existed.
    ensure_synthetic_dataset(tmp_path / "default", SyntheticConfig(num_train=1, num_val=1, image_size=64, max_face=32))
    assert "preset" not in json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert not (tmp_path / "default" / "train" / "attributes").exists()
