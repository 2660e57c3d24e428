"""Run configs: YAML files plus `key=value` overrides, validated into typed sections.

A run YAML states only what differs from the defaults:

    epochs: 50
    model:
      size: s
      fusion: efficient
    train:
      global_batch: 40
      precision: bf16

`model:` may also name a model file (`model: model/adyolo_s_efficient.yaml`, relative to the run
file). Overrides use dotted keys: `model.size=n model.checkpoint=[neck.low_fusion]`; their values
are parsed as YAML. Any bad key or value raises `ConfigError` naming the file and line (or the
override) where it was written.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adyolo.data.config import DataConfig
from adyolo.engine.config import LogConfig, OptimConfig, TrainConfig
from adyolo.loss.config import LossConfig
from adyolo.model.config import ModelConfig
from adyolo.schema import ConfigError, from_mapping


@dataclass
class RunConfig:
    output_dir: str = "runs/train"
    """Run directory: checkpoints, weights, the MLflow store and artifacts."""
    epochs: int = 100
    """Passes over the training set."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("epochs", f"{self.epochs} must be at least 1")
        if not self.output_dir:
            raise ConfigError("output_dir", "must name a folder")
        # The loss's objectness weights follow the model's levels (4 for GD, 3 for yolov5face); written in,
        # so the saved config holds what the run used.
        try:
            balance = self.loss.balance_for(self.model.num_levels, self.model.neck)
        except ConfigError as err:
            raise err.under("loss") from None
        if balance != self.loss.balance:
            self.loss = dataclasses.replace(self.loss, balance=balance)
        if self.train.compile and self.model.checkpoint:
            # The recompute restores BatchNorm buffers in a context torch.compile cannot trace.
            raise ConfigError(
                "train.compile",
                f"cannot be combined with activation checkpointing (model.checkpoint={list(self.model.checkpoint)}); "
                "set train.compile=false or model.checkpoint=[]",
            )


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run YAML (or start from defaults), apply `key=value` overrides, validate."""
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        data, where = _read_mapping(Path(path))
        if isinstance(data.get("model"), str):
            model_file = Path(path).parent / data["model"]
            data["model"], model_where = _read_mapping(model_file, prefix="model")
            where.update(model_where)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value, item)
        where[key] = f"override '{item}'"
    return _validated(RunConfig, data, where, prefix="")


def load_model_config(path: str | Path) -> ModelConfig:
    """Read a model file: either the model section itself or a run config with a `model:` section."""
    data, where = _read_mapping(Path(path))
    if "model" in data:
        return load_run_config(path).model
    return _validated(ModelConfig, data, {f"model.{k}": v for k, v in where.items()}, prefix="model")


def _validated(cls, data: dict[str, Any], where: dict[str, str], prefix: str):
    try:
        return from_mapping(cls, data, prefix)
    except ConfigError as err:
        raise err.at(_locate(err.key, where)) from None


def _locate(key: str, where: dict[str, str]) -> str:
    """Where `key` (or its nearest written parent) came from; `<defaults>` if nowhere."""
    key = re.sub(r"\[\d+\]", "", key)
    while key:
        if key in where:
            return where[key]
        key = key.rpartition(".")[0]
    return "<defaults>"


def _read_mapping(path: Path, prefix: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a YAML mapping and record `file:line` of every key (dotted, under `prefix`)."""
    if not path.is_file():
        raise ConfigError(prefix or "config", f"file {str(path)!r} does not exist", location=str(path))
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(prefix or "config", f"not valid YAML: {err}", location=f"{path}{line}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(
            prefix or "config", f"expected a mapping of keys to values, got {type(data).__name__}", location=str(path)
        )
    where: dict[str, str] = {}
    _record_lines(root, prefix, str(path), where)
    return data, where


def _record_lines(node: yaml.Node, prefix: str, filename: str, where: dict[str, str]) -> None:
    """Record where each key was written. A key written twice in one mapping raises `ConfigError` naming
    both lines: YAML itself keeps the last one and says nothing."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in where:
            first = where[key].rpartition(":")[2]
            raise ConfigError(
                key,
                f"written twice, on lines {first} and {line} (YAML would silently keep the second); keep one",
                location=f"{filename}:{line}",
            )
        where[key] = f"{filename}:{line}"
        _record_lines(value_node, key, filename, where)


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(
            key or item,
            "an override must look like section.key=value, e.g. model.size=n",
            location=f"override '{item}'",
        )
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(key, f"value {raw!r} is not valid YAML: {err}", location=f"override '{item}'") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any, item: str) -> None:
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                ".".join(parents[: i + 1]),
                f"is {child!r}, not a section; cannot set {key}",
                location=f"override '{item}'",
            )
        node = child
    node[leaf] = value
