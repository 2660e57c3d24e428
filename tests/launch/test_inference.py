"""Inference library and weight loading on the trained tiny detector: coordinates, batching, bad weights."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from adyolo.data.faces import Faces
from adyolo.data.transforms import PAD_VALUE, letterbox
from adyolo.model import build_model
from adyolo.predict.detector import Detector
from adyolo.predict.job import batched, detections_to_json
from adyolo.predict.postprocess import postprocess, unletterbox
from adyolo.weights import WeightsError, load_weights, save_weights

from .helpers import read, val_images

CONF = 0.001  # the tiny detector's scores are low; this keeps plenty of detections to compare


@pytest.fixture(scope="module")
def weights(trained_run):
    model, config = load_weights(trained_run / "best.pt")
    return model, config


@pytest.fixture(scope="module")
def image(trained_run):
    # 128 x 96: letterboxed to 96 px with ratio 0.75 and exactly 12 px of padding above and below.
    return cv2.resize(read(sorted(val_images(trained_run).glob("*.jpg"))[0]), (128, 96), interpolation=cv2.INTER_AREA)


def test_detections_are_the_letterboxed_ones_mapped_back(weights, image):
    model, config = weights
    detector = Detector(model, config["model"]["img_size"], CONF)
    (found,) = detector([image])
    assert found.shape[1] == 16 and len(found) > 0

    # The same steps by hand: letterbox, forward, decode, NMS on the network's input.
    boxed, _, (ratio, pad_x, pad_y) = letterbox(image, Faces.empty(), 96)
    assert (ratio, pad_x, pad_y) == (0.75, 0.0, 12.0)
    x = torch.from_numpy(np.ascontiguousarray(boxed[..., ::-1].transpose(2, 0, 1)))[None].float() / 255
    with torch.no_grad():
        (on_input,) = postprocess(model.head.decode(model(x)), CONF, 0.5)
    expected = unletterbox(on_input, ratio, pad_x, pad_y).numpy()
    expected[:, [0, 2]] = expected[:, [0, 2]].clip(0, 128)
    expected[:, [1, 3]] = expected[:, [1, 3]].clip(0, 96)
    np.testing.assert_allclose(found, expected, atol=1e-4)
    # ...and the mapping itself: original = (input - pad) / ratio for box corners and landmarks alike.
    np.testing.assert_allclose(found[:, 5:15:2], (on_input[:, 5:15:2].numpy() - pad_x) / ratio, atol=1e-4)
    np.testing.assert_allclose(found[:, 6:15:2], (on_input[:, 6:15:2].numpy() - pad_y) / ratio, atol=1e-4)


def test_a_padded_copy_gives_the_same_faces_shifted(weights, image):
    """Grey rows added above and below (16 px = the letterbox's own 12 px at ratio 0.75) give the network
    the same input; the detections must be the same faces, 16 px lower, whatever the batch holds."""
    model, config = weights
    detector = Detector(model, config["model"]["img_size"], CONF)
    padded = cv2.copyMakeBorder(image, 16, 16, 0, 0, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    alone = detector([image])[0]
    mixed_batch = detector([padded, image])
    np.testing.assert_allclose(mixed_batch[1], alone, atol=1e-3)
    shifted = mixed_batch[0].copy()
    shifted[:, [1, 3, 6, 8, 10, 12, 14]] -= 16
    inside = (alone[:, 1] > 0.5) & (alone[:, 3] < 95.5)  # boxes clipped at the original's edges differ
    np.testing.assert_allclose(shifted[inside][:, :15], alone[inside][:, :15], atol=0.05)


def test_json_record_and_batching():
    dets = np.zeros((2, 16), np.float32)
    dets[0, :5] = [1, 2, 30, 40, 0.9]
    dets[0, 5:15] = np.arange(10)
    (first, _) = detections_to_json(dets)
    assert first == {
        "box": [1.0, 2.0, 30.0, 40.0],
        "score": 0.9,
        "landmarks": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]],
        "class": 0,
    }
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]


def test_image_size_must_fit_the_strides(weights):
    with pytest.raises(ValueError, match="multiple of the largest stride"):
        Detector(weights[0], 100)


def test_load_weights_rejects_what_is_not_our_checkpoint(trained_run, weights, tmp_path):
    model, config = weights
    assert not model.training
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(WeightsError, match=r"notes\.pt: not a readable adyolo weights file"):
        load_weights(text)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)  # e.g. a checkpoint of another project
    with pytest.raises(WeightsError, match=r"no 'model' state dict; found \['state_dict'\]"):
        load_weights(other)
    # Weights of another model: an efficient-fusion state dict under a config that says full fusion.
    mismatched = tmp_path / "mismatched.pt"
    save_weights(mismatched, model.state_dict(), {**config, "model": {**config["model"], "fusion": "full"}})
    with pytest.raises(WeightsError, match=r"missing keys \(neck\..*unexpected keys \(neck\.") as err:
        load_weights(mismatched)
    assert "\n" not in str(err.value)
    wider = tmp_path / "wider.pt"
    save_weights(wider, build_model({**config["model"], "size": "s"}).state_dict(), config)
    with pytest.raises(WeightsError, match=r"shape mismatches \(backbone\.\S+ \[\d+, 3, \d+, \d+\] vs"):
        load_weights(wider)
