"""`train.init_weights`: adyolo weights into the same or another model, the load report, bad files, and a
bad file stopping a training run before any work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adyolo.failures import InputError
from adyolo.init_weights import apply_init_weights, read_init_weights
from adyolo.model import ModelConfig, build_model
from adyolo.schema import to_dict
from adyolo.weights import save_weights
from tests.engine.runs import run, train_command

TINY_GD = ModelConfig(size="n", fusion="efficient", img_size=96)
TINY_PAN = dataclasses.replace(TINY_GD, neck="yolov5face", anchors=None)


def saved(path, cfg: ModelConfig, seed: int):
    """An adyolo weights file of a model built from `seed`; returns the model."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    save_weights(path, model.state_dict(), {"model": to_dict(cfg)}, epoch=3)
    return model


def test_weights_of_the_same_model_load_completely_and_give_its_outputs(tmp_path):
    source = saved(tmp_path / "best.pt", TINY_GD, seed=1)
    torch.manual_seed(2)
    model = build_model(TINY_GD)
    report = apply_init_weights(model, read_init_weights(tmp_path / "best.pt"))

    assert report.kind == "adyolo weights" and not report.left_random and not report.unused
    assert len(report.loaded) == len(model.state_dict()) and report.loaded_parameters == report.total_parameters
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        for ours, theirs in zip(model.eval()(images), source.eval()(images)):
            assert torch.equal(ours, theirs)
    params = report.params()
    assert params["init.loaded_tensors"] == len(model.state_dict()) and params["init.left_random"] == "nothing"


def test_a_baseline_file_gives_the_gd_model_its_backbone_and_the_report_says_why_not_more(tmp_path):
    source = saved(tmp_path / "best.pt", TINY_PAN, seed=1)
    model = build_model(TINY_GD)
    report = apply_init_weights(model, read_init_weights(tmp_path / "best.pt"))

    backbone = [n for n in model.state_dict() if n.startswith("backbone.")]
    assert sorted(report.loaded) == sorted(backbone)
    assert all(torch.equal(model.state_dict()[n], source.state_dict()[n]) for n in backbone)
    reasons = set(report.left_random.values())
    assert reasons == {
        "not in the file",
        "the file's head has no stride-4 level",
        "the file's stride-8 level has other anchors (4, 5, 8, 10, 13, 16)",
        "the file's stride-16 level has other anchors (23, 29, 43, 55, 73, 105)",
        "the file's stride-32 level has other anchors (146, 217, 231, 300, 335, 433)",
    }
    assert {n.split(".")[0] for n, r in report.unused.items() if r == "not in this model"} == {"neck"}
    params = report.params()
    assert params["init.loaded"] == f"backbone {len(backbone)}" and params["init.weights"] == str(tmp_path / "best.pt")


def test_other_sizes_and_bare_state_dicts(tmp_path):
    saved(tmp_path / "s.pt", dataclasses.replace(TINY_GD, size="s"), seed=1)
    report = apply_init_weights(build_model(TINY_GD), read_init_weights(tmp_path / "s.pt"))
    # Size s into size n: only what has the same shape at any width (BatchNorm counters, output biases,
    # the efficient fusion's 2-channel spatial conv).
    assert report.loaded_parameters < 0.001 * report.total_parameters
    assert not [n for n in report.loaded if n.startswith("backbone.") and n.endswith("weight")]
    assert report.left_random["backbone.stem.stem_1.0.weight"] == "shape [32, 3, 3, 3] in the file, [16, 3, 3, 3] here"

    torch.manual_seed(3)
    bare = build_model(TINY_GD).state_dict()
    torch.save({k: v for k, v in bare.items() if not k.startswith("neck.")}, tmp_path / "bare.pt")
    report = apply_init_weights(build_model(TINY_GD), read_init_weights(tmp_path / "bare.pt"))
    assert report.kind == "state dict" and set(report.left_random.values()) == {"not in the file"}
    assert {n.split(".")[0] for n in report.loaded} == {"backbone", "head"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        (b"not a checkpoint", "not a readable weights file"),
        ({"epoch": 3, "names": ["face"]}, r"neither weights nor a state dict \(found \['epoch', 'names'\]\)"),
    ],
)
def test_files_that_are_not_weights_are_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(InputError, match=rf"^train.init_weights={path}: {expected}") as caught:
        read_init_weights(path)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value) and "docs/weights.md" in str(caught.value)


# ---------------------------------------------------------------------------------------------------
# In a training run (a run started from a file, and one resumed, are in tests/test_compare.py)


def test_a_missing_file_stops_the_run_before_any_work(tmp_path):
    out = tmp_path / "run"
    result = run(train_command(out, tmp_path / "data", f"train.init_weights={tmp_path / 'nope.pt'}"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("or unset train.init_weights")
    assert f"train.init_weights={tmp_path / 'nope.pt'}: no such file" in result.stderr
    assert not out.exists() and not (tmp_path / "data").exists()
