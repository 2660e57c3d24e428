"""`train.init_weights`: a training run that starts from weights trained elsewhere.

The file may be

* an adyolo `best.pt` / `last.pt` (`adyolo.weights`), of any size, neck or fusion;
* a YOLOv5-Face state dict (`model.<i>.*` names), e.g. made from its released `yolov5s-face.pt` with that
  repository in one line (docs/weights.md); its names are mapped onto adyolo's (`adyolo.yolov5face`);
* a YOLOv5-Face checkpoint as that repository saves it (a pickled model), read without its code by a
  restricted unpickler (`adyolo.yolov5face.read_yolov5face_checkpoint`);
* a plain state dict under adyolo's names.

Every tensor of the model whose name the file holds with the same shape is copied; the rest stays at its
random initialisation. A detection level's output conv is copied only where the file's head predicts the
same stride with the same anchors (a yolov5face head's stride-8 conv is no use to a GD model's stride-4
level, nor to its stride-8 level with other anchors). `InitReport` says what was loaded, what was left
random and why, and what of the file was not used; the run prints it and logs it as MLflow params
(`init.*`). A resumed run never reads the file: its checkpoint holds the weights.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adyolo.failures import InputError
from adyolo.model.config import LEVEL_STRIDES, ModelConfig
from adyolo.schema import ConfigError, from_mapping
from adyolo.yolov5face import (
    YOLOv5FaceError,
    is_yolov5face_state_dict,
    read_yolov5face_checkpoint,
    to_adyolo_names,
)

HINT = (
    "pass an adyolo best.pt / last.pt, a YOLOv5-Face checkpoint or its state dict "
    "(docs/weights.md); or unset train.init_weights"
)


@dataclass
class InitWeights:
    """A weights file read and named in adyolo's terms, not yet applied to a model."""

    path: str
    kind: str  # "adyolo weights", "YOLOv5-Face state dict", "YOLOv5-Face checkpoint", "state dict"
    tensors: dict[str, torch.Tensor]  # adyolo names
    # Per detection level of the file's head: (stride, [3, 2] anchors in pixels, or None where the file does
    # not say); None for a bare state dict, whose head names are taken as they are.
    levels: list[tuple[int, torch.Tensor | None]] | None
    unmapped: dict[str, str] = field(default_factory=dict)  # file names with no adyolo name -> why


@dataclass
class InitReport:
    path: str
    kind: str
    loaded: list[str]
    left_random: dict[str, str]  # model tensor -> why
    unused: dict[str, str]  # file tensor -> why
    loaded_parameters: int
    total_parameters: int

    def describe(self) -> str:
        """What the run prints: one line, then the left-random and unused tensors grouped by reason."""
        total = len(self.loaded) + len(self.left_random)
        lines = [
            f"init_weights {self.path} ({self.kind}): loaded {len(self.loaded)} of {total} tensors, "
            f"{self.loaded_parameters / 1e6:.3f} M of {self.total_parameters / 1e6:.3f} M parameters "
            f"({_parts(self.loaded)})"
        ]
        for title, entries in (("left random", self.left_random), ("not used from the file", self.unused)):
            for reason, names in _by_reason(entries).items():
                lines.append(f"  {title}: {len(names)} tensors ({_parts(names)}): {reason}")
        return "\n".join(lines)

    def params(self) -> dict[str, str | int]:
        """MLflow params (`init.*`)."""
        return {
            "init.weights": self.path,
            "init.kind": self.kind,
            "init.loaded_tensors": len(self.loaded),
            "init.loaded_parameters": self.loaded_parameters,
            "init.loaded": _parts(self.loaded) or "nothing",
            "init.left_random_tensors": len(self.left_random),
            "init.left_random": _summary(self.left_random) or "nothing",
            "init.unused_tensors": len(self.unused),
            "init.unused": _summary(self.unused) or "nothing",
        }


# ---------------------------------------------------------------------------------------------------
# Reading


def read_init_weights(path: str | Path) -> InitWeights:
    """Read and recognise a weights file; `InputError` (one line: the file, what is wrong, what to pass)
    for anything that is not one of the kinds above. Nothing is built."""
    path = Path(path)
    where = f"train.init_weights={path}"
    if not path.is_file():
        raise InputError(f"{where}: no such file; {HINT}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # not written by torch.save at all
            raise InputError(f"{where}: not a readable weights file ({_first_line(err)}); {HINT}") from None
        # Not plain tensors and containers: a pickled module, as YOLOv5-Face saves its checkpoints.
        try:
            state = read_yolov5face_checkpoint(path)
        except YOLOv5FaceError as err:
            raise InputError(f"{where}: {err}") from None
        except Exception as err:  # a corrupt pickle raises whatever its bytes lead to
            raise InputError(f"{where}: not a readable checkpoint ({_first_line(err)}); {HINT}") from None
        return _from_yolov5face(path, state, "YOLOv5-Face checkpoint")
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise InputError(f"{where}: not a readable weights file ({_first_line(err)}); {HINT}") from None
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        if is_yolov5face_state_dict(payload["model"]):
            return _from_yolov5face(path, payload["model"], "YOLOv5-Face state dict")
        return _from_adyolo(path, payload, where)
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        if is_yolov5face_state_dict(payload):
            return _from_yolov5face(path, payload, "YOLOv5-Face state dict")
        return InitWeights(str(path), "state dict", dict(payload), levels=None)
    found = sorted(map(str, payload))[:5] if isinstance(payload, dict) else type(payload).__name__
    raise InputError(f"{where}: neither weights nor a state dict (found {found}); {HINT}")


def _from_adyolo(path: Path, payload: dict, where: str) -> InitWeights:
    config = payload.get("config")
    levels = None
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        try:
            model_cfg = from_mapping(ModelConfig, config["model"], "model")
        except ConfigError as err:
            raise InputError(f"{where}: its saved model config is not valid for this adyolo ({err})") from None
        levels = _levels(model_cfg.strides, model_cfg.anchors)
    return InitWeights(str(path), "adyolo weights", dict(payload["model"]), levels)


def _from_yolov5face(path: Path, state: dict[str, torch.Tensor], kind: str) -> InitWeights:
    tensors, unmapped, anchors = to_adyolo_names(state)
    grid = anchors.get("anchor_grid")
    levels = [(s, grid[i] if grid is not None else None) for i, s in enumerate(LEVEL_STRIDES["yolov5face"])]
    return InitWeights(str(path), kind, tensors, levels, unmapped)


def _levels(strides, anchors) -> list[tuple[int, torch.Tensor]]:
    return [(int(s), torch.tensor(a, dtype=torch.float32).view(-1, 2)) for s, a in zip(strides, anchors)]


# ---------------------------------------------------------------------------------------------------
# Applying


@torch.no_grad()
def apply_init_weights(model: nn.Module, weights: InitWeights) -> InitReport:
    """Copy every tensor of `weights` that fits `model` (an `ADYOLOFace`) into it, in place."""
    own = model.state_dict()
    head = _head_sources(model, weights)
    loaded, left_random, unused = [], {}, dict(weights.unmapped)
    used_sources = set()
    for name, target in own.items():
        source_name = head.get(name, name) if name.startswith("head.") else name
        if isinstance(source_name, tuple):  # a head conv with no matching level in the file
            left_random[name] = source_name[1]
            continue
        source = weights.tensors.get(source_name)
        if source is None:
            left_random[name] = "not in the file"
            continue
        if source.shape != target.shape:
            left_random[name] = f"shape {list(source.shape)} in the file, {list(target.shape)} here"
            used_sources.add(source_name)
            unused[source_name] = "its shape differs from this model's"
            continue
        target.copy_(source.to(target.dtype))
        loaded.append(name)
        used_sources.add(source_name)
    for name in weights.tensors:
        if name not in used_sources and name not in unused:
            head_level = name.startswith("head.")
            unused[name] = "no level of this model has its stride and anchors" if head_level else "not in this model"
    parameters = dict(model.named_parameters())
    return InitReport(
        path=weights.path,
        kind=weights.kind,
        loaded=loaded,
        left_random=left_random,
        unused=unused,
        loaded_parameters=sum(parameters[n].numel() for n in loaded if n in parameters),
        total_parameters=sum(p.numel() for p in parameters.values()),
    )


def _head_sources(model: nn.Module, weights: InitWeights) -> dict[str, str | tuple[None, str]]:
    """Model head tensor -> the file's tensor for the same stride and anchors, or (None, why not)."""
    strides = [int(s) for s in model.head.strides.tolist()]
    anchors = model.head.anchors.float()
    sources: dict[str, str | tuple[None, str]] = {}
    for level, stride in enumerate(strides):
        for kind in ("weight", "bias"):
            name = f"head.convs.{level}.{kind}"
            if weights.levels is None:  # a bare state dict: trust its names
                sources[name] = name
                continue
            match = next((i for i, (s, _) in enumerate(weights.levels) if s == stride), None)
            file_anchors = weights.levels[match][1] if match is not None else None
            if match is None:
                sources[name] = (None, f"the file's head has no stride-{stride} level")
            elif file_anchors is not None and not torch.allclose(file_anchors, anchors[level].cpu(), atol=1e-3):
                shown = _round(file_anchors.flatten().tolist())
                sources[name] = (None, f"the file's stride-{stride} level has other anchors ({shown})")
            else:
                sources[name] = f"head.convs.{match}.{kind}"
    return sources


# ---------------------------------------------------------------------------------------------------
# Wording


def _parts(names) -> str:
    """'backbone 180, neck 10': tensors per top-level module."""
    counts = Counter(name.split(".")[0] for name in names)
    return ", ".join(f"{part} {count}" for part, count in counts.items())


def _by_reason(entries: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, reason in entries.items():
        grouped.setdefault(reason, []).append(name)
    return grouped


def _summary(entries: dict[str, str]) -> str:
    return "; ".join(f"{_parts(names)}: {reason}" for reason, names in _by_reason(entries).items())[:500]


def _round(values: list[float]) -> str:
    return ", ".join(f"{v:g}" if math.isfinite(v) else str(v) for v in values)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
