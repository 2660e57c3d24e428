"""Run and model configs: YAML + overrides, and errors that say where and what to fix."""

from __future__ import annotations

import textwrap

import pytest

from adyolo.config import load_model_config, load_run_config
from adyolo.model import ModelConfig, build_model
from adyolo.schema import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_without_a_file():
    assert load_run_config().model == ModelConfig()


def test_run_file_and_overrides(tmp_path):
    path = write(
        tmp_path,
        "run.yaml",
        """
        model:
          size: n
          fusion: efficient
    """,
    )
    cfg = load_run_config(path, ["model.img_size=320", "model.checkpoint=[neck.low_fusion]"])
    assert (cfg.model.size, cfg.model.fusion, cfg.model.img_size) == ("n", "efficient", 320)
    assert cfg.model.checkpoint == ["neck.low_fusion"]
    assert cfg.model.attention == "sdpa"  # unstated keys keep their defaults


def test_model_section_can_name_a_model_file(tmp_path):
    write(tmp_path, "model/small.yaml", "size: n\nfusion: efficient\n")
    path = write(tmp_path, "run.yaml", "model: model/small.yaml\n")
    assert load_run_config(path).model == ModelConfig(size="n", fusion="efficient")
    assert load_model_config(tmp_path / "model/small.yaml") == ModelConfig(size="n", fusion="efficient")
    assert load_model_config(path) == ModelConfig(size="n", fusion="efficient")


def test_shipped_model_configs_load():
    from pathlib import Path

    files = sorted(Path(__file__).parents[1].glob("launch/configs/model/*.yaml"))
    assert files
    for f in files:
        build_model(load_model_config(f))


@pytest.mark.parametrize(
    "body,key,line,words",
    [
        ("model:\n  size: s\n  fusoin: full\n", "model.fusoin", 3, ["unknown key", "did you mean 'fusion'"]),
        ("model:\n  size: 5\n", "model.size", 2, ["5 (int)", "'n', 's', 'm'"]),
        ("model:\n  img_size: 650\n", "model.img_size", 2, ["multiple of 32", "use 640 or 672"]),
        ("model:\n  img_size: '640'\n", "model.img_size", 2, ["expected an integer", "'640' (str)"]),
        (
            "model:\n  checkpoint: [neck.lowfusion]\n",
            "model.checkpoint",
            2,
            ["unknown block 'neck.lowfusion'", "neck.low_fusion"],
        ),
        ("model:\n  anchors: [[1, 2, 3]]\n", "model.anchors", 2, ["4 lists of 6 numbers"]),
        ("model:\n  attention_heads: 3\n", "model.attention_heads", 2, ["does not divide the 128"]),
        ("data:\n  augment:\n    close_mosaic: -1\n", "data.augment.close_mosaic", 3, ["-1 must be 0 or more"]),
        ("modle:\n  size: s\n", "modle", 1, ["unknown key", "did you mean 'model'"]),
        (
            "model:\n  neck: yolov5face\n  anchors: [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]\n",
            "model.anchors",
            3,
            ["expected 3 levels (strides 8, 16, 32) for neck 'yolov5face'", "3 lists of 6 numbers"],
        ),
        (
            "model:\n  neck: yolov5face\n  checkpoint: [neck.low_fusion]\n",
            "model.checkpoint",
            3,
            ["unknown block 'neck.low_fusion' for neck 'yolov5face'", "backbone.stem", "neck.top_down_p3"],
        ),
        (
            "model:\n  neck: yolov5face\nloss:\n  balance: [4.0, 1.0, 0.25, 0.06]\n",
            "loss.balance",
            4,
            ["has 4 weights, the 'yolov5face' neck's model has 3 detection levels", "[4.0, 1.0, 0.4]"],
        ),
        (
            "model:\n  checkpoint: [all]\ntrain:\n  compile: true\n",
            "train.compile",
            4,
            ["activation checkpointing", "train.compile=false or model.checkpoint=[]"],
        ),
        # A key written twice: YAML keeps the last one without a word.
        ("epochs: 1\nmodel:\n  size: n\nepochs: 3\n", "epochs", 4, ["written twice, on lines 1 and 4", "keep one"]),
        ("model:\n  size: n\n  fusion: full\n  size: s\n", "model.size", 4, ["lines 2 and 4"]),
        # Optimiser values torch.optim would refuse, or train on into NaN.
        ("optim:\n  warmup_momentum: 1.5\n", "optim.warmup_momentum", 2, ["1.5 must be in [0, 1)"]),
        ("optim:\n  lr: .nan\n", "optim.lr", 2, ["nan must be a finite number"]),
        ("optim:\n  weight_decay: .inf\n", "optim.weight_decay", 2, ["inf must be a finite number"]),
    ],
)
def test_bad_values_name_file_line_key_and_fix(tmp_path, body, key, line, words):
    path = write(tmp_path, "run.yaml", body)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert err.value.key == key
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: {key}: ")
    for w in words:
        assert w in message


def test_exponent_numerals_are_numbers():
    # YAML 1.1 (PyYAML) reads 5e-4 as a string; float fields still take it.
    cfg = load_run_config(None, ["optim.weight_decay=5e-4", "optim.lr=1e-2"])
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.lr == 0.01
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        load_run_config(None, ["optim.lr=fast"])


def test_bad_override_names_the_override():
    with pytest.raises(
        ConfigError, match=r"override 'model.fusion=ful': model.fusion: 'ful' \(str\) is not one of 'full', 'efficient'"
    ):
        load_run_config(None, ["model.fusion=ful"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_run_config(None, ["model.size"])


def test_invalid_yaml_points_at_the_line(tmp_path):
    path = write(tmp_path, "run.yaml", "model:\n  size: [n\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: config: not valid YAML"):
        load_run_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config("no/such/run.yaml")


def test_build_model_rejects_bad_mapping():
    with pytest.raises(ConfigError, match=r"^model.fusion: 'ful' \(str\) is not one of"):
        build_model({"fusion": "ful"})
    with pytest.raises(ConfigError, match=r"^model.img_size: 100 is not a positive multiple of 32"):
        build_model({"img_size": 100})


def test_the_neck_sets_the_levels_anchors_and_loss_balance():
    gd, yolo = load_run_config(), load_run_config(None, ["model.neck=yolov5face"])
    assert (gd.model.num_levels, yolo.model.num_levels) == (4, 3)
    # Resolved into the config (and so into config.yaml and best.pt): the 4-level default is unchanged.
    assert gd.loss.balance == [4.0, 1.0, 0.25, 0.06] and yolo.loss.balance == [4.0, 1.0, 0.4]
    assert yolo.model.anchors == [[4, 5, 8, 10, 13, 16], [23, 29, 43, 55, 73, 105], [146, 217, 231, 300, 335, 433]]
    assert load_run_config(None, ["model.neck=yolov5face", "loss.balance=[3.0, 1.0, 0.5]"]).loss.balance == [
        3.0,
        1.0,
        0.5,
    ]
    with pytest.raises(ConfigError, match=r"override 'loss.balance=\[1, 1, 1\]': loss.balance: .* has 3 weights"):
        load_run_config(None, ["loss.balance=[1, 1, 1]"])


def test_shipped_yolov5face_model_config_is_the_baseline():
    from pathlib import Path

    cfg = load_model_config(Path(__file__).parents[1] / "launch/configs/model/yolov5face_s.yaml")
    assert cfg == ModelConfig(size="s", neck="yolov5face") and cfg.variant == "yolov5face"
