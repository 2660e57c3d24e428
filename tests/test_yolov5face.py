"""YOLOv5-Face's weights in adyolo: the name mapping, YOLOv5-Face's own outputs reproduced, and its pickled
checkpoints read without its code, and never anything else.

The names and shapes come from YOLOv5-Face's yolov5s.yaml (tests/fixtures/yolov5face/). The reference
outputs (YOLOv5-Face's own forward of a random yolov5s, 14.5 MB) are the project's research data, read
where it lies (`ADYOLO_YOLOV5FACE_REFERENCE`, or `shared/research/yolov5-face/` beside the checkout)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adyolo.failures import InputError
from adyolo.init_weights import apply_init_weights, read_init_weights
from adyolo.model import build_model
from adyolo.model.config import YOLOV5FACE_ANCHORS
from adyolo.yolov5face import LAYER_TO_MODULE, YOLOv5FaceError, read_yolov5face_checkpoint, to_adyolo_names

FIXTURES = Path(__file__).parent / "fixtures" / "yolov5face"
NAMES = FIXTURES / "yolov5s-face-state-dict.json"
REFERENCE_NAME = Path("research") / "yolov5-face" / "yolov5s-face-reference.pt"


def yolov5s_face_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under YOLOv5-Face's names and shapes (yolov5s.yaml, nc 1), its anchors in anchor_grid."""
    generator = torch.Generator().manual_seed(seed)
    spec = json.loads(NAMES.read_text())["state_dict"]
    state = {
        name: torch.tensor(3) if dtype == "int64" else torch.randn(shape, generator=generator)
        for name, shape, dtype in spec
    }
    state["model.23.anchor_grid"] = torch.tensor(YOLOV5FACE_ANCHORS).view(3, 1, 3, 1, 1, 2)
    return state


def reference_file() -> Path | None:
    candidates = [os.environ.get("ADYOLO_YOLOV5FACE_REFERENCE", "")]
    candidates += [str(parent / "shared" / REFERENCE_NAME) for parent in Path(__file__).resolve().parents]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def test_every_yolov5s_face_tensor_loads_into_the_baseline(tmp_path):
    state = yolov5s_face_state_dict()
    torch.save(state, tmp_path / "sd.pt")
    model = build_model({"neck": "yolov5face", "size": "s"})
    report = apply_init_weights(model, read_init_weights(tmp_path / "sd.pt"))

    assert report.kind == "YOLOv5-Face state dict" and not report.left_random
    assert len(report.loaded) == len(model.state_dict()) == 372
    assert report.loaded_parameters == report.total_parameters == 7_074_640
    assert set(report.unused) == {"model.23.anchors", "model.23.anchor_grid"}
    own = model.state_dict()
    mapped, _, _ = to_adyolo_names(state)
    assert all(torch.equal(own[name], tensor) for name, tensor in mapped.items())
    # Spot checks of the mapping itself: a backbone conv, a BatchNorm inside a C3, the head.
    assert torch.equal(own["backbone.stage2.0.0.weight"], state["model.2.conv.weight"])
    assert torch.equal(own["neck.top_down_p3.refine.m.0.cv2.1.running_var"], state["model.16.m.0.cv2.bn.running_var"])
    assert torch.equal(own["head.convs.2.bias"], state["model.23.m.2.bias"])


def test_the_gd_model_takes_the_backbone_and_says_why_not_the_rest(tmp_path):
    torch.save(yolov5s_face_state_dict(), tmp_path / "sd.pt")
    model = build_model({"neck": "gd", "size": "s"})
    report = apply_init_weights(model, read_init_weights(tmp_path / "sd.pt"))

    backbone = [n for n in model.state_dict() if n.startswith("backbone.")]
    assert sorted(report.loaded) == sorted(backbone) and len(backbone) == 222
    assert {n.split(".")[0] for n in report.left_random} == {"neck", "head"}
    assert report.left_random["head.convs.0.weight"] == "the file's head has no stride-4 level"
    assert report.left_random["head.convs.1.weight"].startswith("the file's stride-8 level has other anchors")
    assert all(report.unused[f"neck.lateral5.{i}.weight"] == "not in this model" for i in (0, 1))
    assert "neck 463: not in the file" in report.params()["init.left_random"]
    text = report.describe()
    assert text.splitlines()[0].endswith("(backbone 222)") and "left random: 463 tensors (neck 463)" in text


@pytest.mark.skipif(reference_file() is None, reason="YOLOv5-Face reference outputs not found (research data)")
def test_yolov5face_outputs_are_reproduced_from_its_state_dict(tmp_path):
    reference = torch.load(reference_file(), weights_only=True)
    torch.save(reference["state_dict"], tmp_path / "sd.pt")  # fp16, as saved: read as it is
    model = build_model({"neck": "yolov5face", "size": "s"})
    report = apply_init_weights(model, read_init_weights(tmp_path / "sd.pt"))
    assert len(report.loaded) == 372 and not report.left_random

    model.eval()
    with torch.no_grad():
        raw = model(reference["input"])
        decoded = model.head.decode(raw)
    assert len(raw) == len(reference["raw"]) == 3
    for ours, theirs in zip(raw, reference["raw"]):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    assert decoded.shape == reference["decoded"].shape == (1, 756, 16)
    torch.testing.assert_close(decoded, reference["decoded"], rtol=1e-4, atol=1e-4)


def test_the_layer_table_covers_yolov5s_layers_with_weights():
    layers = {int(name.split(".")[1]) for name, _, _ in json.loads(NAMES.read_text())["state_dict"]}
    assert layers - {23} == set(LAYER_TO_MODULE)


# ---------------------------------------------------------------------------------------------------
# Pickled checkpoints


@pytest.fixture(scope="module")
def pickled_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint written as YOLOv5-Face writes one (its class names, fp16, a NumPy best_fitness), by a
    separate process that has the stand-in `models` package; this process never imports it."""
    folder = tmp_path_factory.mktemp("yolov5face")
    out, plain = folder / "yolov5s-face.pt", folder / "plain.pt"
    repo = FIXTURES / "repo"
    command = [sys.executable, str(repo / "save_checkpoint.py"), str(NAMES), str(out), str(plain)]
    subprocess.run(command, cwd=repo, check=True, timeout=120, capture_output=True)
    return out, plain


def test_a_pickled_checkpoint_is_read_without_the_repository(pickled_checkpoint):
    out, plain = pickled_checkpoint
    assert "models" not in sys.modules
    with pytest.raises(pickle.UnpicklingError):  # what plain weights-only loading says of it
        torch.load(out, weights_only=True)
    state = read_yolov5face_checkpoint(out)
    expected = torch.load(plain, weights_only=True)
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    assert state["model.0.stem_1.conv.weight"].dtype == torch.float32
    assert "models" not in sys.modules

    weights = read_init_weights(out)
    assert weights.kind == "YOLOv5-Face checkpoint"
    report = apply_init_weights(build_model({"neck": "yolov5face", "size": "s"}), weights)
    assert len(report.loaded) == 372 and not report.left_random


class _RunsCode:
    """What a malicious checkpoint holds: unpickling it would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode(marker), "epoch": -1}, path)
    with pytest.raises(YOLOv5FaceError, match=r"refusing to unpickle posix\.system"):
        read_yolov5face_checkpoint(path)
    with pytest.raises(InputError, match=rf"train.init_weights={path}: .*refusing to unpickle") as caught:
        read_init_weights(path)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_a_stand_in_for_the_repository_runs_no_call_with_arguments(tmp_path, monkeypatch):
    """A global named like YOLOv5-Face's classes but called with arguments (a REDUCE, not a rebuilt module)
    gets the stand-in, which takes none: the file is refused as unreadable, nothing runs."""

    class Conv:  # pickled under YOLOv5-Face's name
        def __reduce__(self):
            return (Conv, ("touch", str(tmp_path / "pwned")))

    Conv.__module__, Conv.__qualname__ = "models.common", "Conv"
    with monkeypatch.context() as patch:  # importable only while it is saved
        patch.setitem(sys.modules, "models", type(sys)("models"))
        patch.setitem(sys.modules, "models.common", type(sys)("models.common"))
        sys.modules["models.common"].Conv = Conv
        torch.save({"model": Conv()}, tmp_path / "odd.pt")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        read_init_weights(tmp_path / "odd.pt")
    assert not (tmp_path / "pwned").exists()
