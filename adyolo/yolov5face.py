"""YOLOv5-Face's weights in adyolo: its `model.<i>.*` tensor names mapped onto adyolo's modules, and its
pickled checkpoints read without its code.

YOLOv5-Face (deepcam-cn/yolov5-face) numbers its layers as its model YAML lists them. For
`models/yolov5s.yaml` (and the n / m files, which differ only in width and depth) the layers map onto
adyolo's `model.neck: yolov5face` at the same size as

    model.0            backbone.stem                 StemBlock, stride 4
    model.1            backbone.stage1               C3
    model.2, 3         backbone.stage2.0, .1         Conv 3x3 s2, C3
    model.4, 5         backbone.stage3.0, .1         Conv 3x3 s2, C3
    model.6, 7, 8      backbone.stage4.0, .1, .2     Conv 3x3 s2, SPP, C3
    model.9            neck.lateral5                 Conv 1x1
    model.12           neck.top_down_p4.refine       C3 (10: upsample, 11: concat)
    model.13           neck.lateral4                 Conv 1x1
    model.16           neck.top_down_p3.refine       C3 (14: upsample, 15: concat)
    model.17, 19       neck.bottom_up_p4.down, .refine
    model.20, 22       neck.bottom_up_p5.down, .refine
    model.23.m.<l>     head.convs.<l>                the 1x1 output convs of strides 8, 16, 32

and inside a layer `conv` / `bn` (YOLOv5's Conv) become `0` / `1` (adyolo's ConvBN, a Sequential).
The GD model has the same backbone, so layers 0-8 load into it too; its neck and head have no
counterpart. `anchors` and `anchor_grid` (model.23) are not weights: adyolo derives them from
`model.anchors`; they are returned apart so the caller can compare them.

YOLOv5-Face's `.pt` files are `torch.save({"model": <models.yolo.Model>, ...})`: a pickled module whose
classes live in that repository. `read_yolov5face_checkpoint` reads one with torch's weights-only
unpickler, which builds nothing but tensors and plain containers unless a global is allowed by name:
here torch's own layer classes (`torch.nn.modules.*`, whose unpickling only sets attributes), NumPy's
array reconstruction and, for the repository's classes (`models.*`, `utils.*`), empty stand-in modules
that receive the pickled attributes and run none of that code. Any other global refuses the whole file.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn

# YOLOv5-Face layer index -> adyolo module path (yolov5s.yaml's layer order).
LAYER_TO_MODULE: dict[int, str] = {
    0: "backbone.stem",
    1: "backbone.stage1",
    2: "backbone.stage2.0",
    3: "backbone.stage2.1",
    4: "backbone.stage3.0",
    5: "backbone.stage3.1",
    6: "backbone.stage4.0",
    7: "backbone.stage4.1",
    8: "backbone.stage4.2",
    9: "neck.lateral5",
    12: "neck.top_down_p4.refine",
    13: "neck.lateral4",
    16: "neck.top_down_p3.refine",
    17: "neck.bottom_up_p4.down",
    19: "neck.bottom_up_p4.refine",
    20: "neck.bottom_up_p5.down",
    22: "neck.bottom_up_p5.refine",
}
DETECT_LAYER = 23
ANCHOR_BUFFERS = ("anchors", "anchor_grid")
# Module prefixes of YOLOv5-Face's own code in its pickles: replaced by stand-ins, never imported.
REPOSITORY_MODULES = ("models.", "utils.")
# NumPy's array and scalar reconstruction (a checkpoint's `best_fitness` is an array): they build an array
# from its shape, dtype and bytes and nothing else. Module name (NumPy 1 or 2) -> attribute.
NUMPY_GLOBALS = {
    "numpy.core.multiarray._reconstruct": ("numpy.core.multiarray", "_reconstruct"),
    "numpy._core.multiarray._reconstruct": ("numpy._core.multiarray", "_reconstruct"),
    "numpy.core.multiarray.scalar": ("numpy.core.multiarray", "scalar"),
    "numpy._core.multiarray.scalar": ("numpy._core.multiarray", "scalar"),
    "numpy.ndarray": ("numpy", "ndarray"),
    "numpy.dtype": ("numpy", "dtype"),
}
_NAME = re.compile(r"model\.(\d+)\.(.+)")


class YOLOv5FaceError(ValueError):
    """A YOLOv5-Face file or tensor name that cannot be read; the message names the file and the fix."""


def is_yolov5face_state_dict(state_dict: dict) -> bool:
    """Whether the names are YOLOv5-Face's (`model.<i>.*`) rather than adyolo's."""
    return any(_NAME.fullmatch(str(k)) for k in state_dict) and not any(
        str(k).startswith(("backbone.", "neck.", "head.")) for k in state_dict
    )


def to_adyolo_names(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """YOLOv5-Face state dict -> (tensors under adyolo's names, YOLOv5-Face name -> why it has no adyolo
    name, {"anchor_grid": [levels, 3, 2] pixels} when the file holds it)."""
    mapped, unmapped, anchors = {}, {}, {}
    for name, tensor in state_dict.items():
        match = _NAME.fullmatch(name)
        if match is None:
            unmapped[name] = "not a YOLOv5-Face layer name (model.<i>.*)"
            continue
        layer, rest = int(match.group(1)), match.group(2)
        if layer == DETECT_LAYER:
            if rest in ANCHOR_BUFFERS:
                if rest == "anchor_grid":
                    anchors["anchor_grid"] = tensor.detach().float().reshape(tensor.shape[0], -1, 2)
                unmapped[name] = "anchors are not weights (adyolo takes them from model.anchors)"
                continue
            head = re.fullmatch(r"m\.(\d+)\.(weight|bias)", rest)
            if head is None:
                unmapped[name] = "not a tensor of YOLOv5-Face's Detect layer"
                continue
            mapped[f"head.convs.{head.group(1)}.{head.group(2)}"] = tensor
            continue
        if layer not in LAYER_TO_MODULE:
            unmapped[name] = f"layer {layer} is not a layer of yolov5s.yaml's that holds weights"
            continue
        inner = re.sub(r"(^|\.)conv\.", r"\g<1>0.", rest)
        inner = re.sub(r"(^|\.)bn\.", r"\g<1>1.", inner)
        mapped[f"{LAYER_TO_MODULE[layer]}.{inner}"] = tensor
    return mapped, unmapped, anchors


# ---------------------------------------------------------------------------------------------------
# The pickled checkpoint


class StandIn(nn.Module):
    """Takes the place of one of YOLOv5-Face's classes while its pickle is read: the attributes the
    pickle holds (child modules, parameters, buffers) land on it; none of that repository's code runs."""


def read_yolov5face_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A YOLOv5-Face `.pt` as its repository saves it ({"model": pickled Model, ...}) -> the model's
    state dict in fp32 (YOLOv5-Face's names). Raises `YOLOv5FaceError` naming any class that is neither
    torch's nor YOLOv5-Face's (the file is then not read at all)."""
    path = Path(path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed, refused = [], []
    for name in unsafe:
        stand_in = _allowed_global(name)
        if stand_in is None:
            refused.append(name)
        else:
            allowed.append((stand_in, name))
    if any(name in NUMPY_GLOBALS for name in unsafe):
        # An array's dtype is built by calling numpy.dtype, which returns an instance of its own class
        # (numpy.dtypes.Float64DType, ...): those classes must be allowed too, though no name in the file says so.
        allowed += [cls for cls in vars(importlib.import_module("numpy.dtypes")).values() if isinstance(cls, type)]
    if refused:
        raise YOLOv5FaceError(
            f"{path}: refusing to unpickle {', '.join(refused[:3])}{', ...' if len(refused) > 3 else ''}: "
            "only torch's layers and YOLOv5-Face's own classes are read from a pickled checkpoint; make a plain "
            "state dict with the YOLOv5-Face repository instead (docs/weights.md)"
        )
    with torch.serialization.safe_globals(allowed):
        payload = torch.load(path, map_location="cpu", weights_only=True)
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, nn.Module):
        found = sorted(map(str, payload))[:5] if isinstance(payload, dict) else type(payload).__name__
        raise YOLOv5FaceError(f"{path}: no pickled model under 'model' (found {found})")
    return {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _allowed_global(name: str):
    """What a global named in the pickle may become: a stand-in for YOLOv5-Face's classes, the class
    itself for torch's layer classes, NumPy's array reconstruction, else None (refused)."""
    if name.startswith(REPOSITORY_MODULES):
        return type(name.rsplit(".", 1)[-1], (StandIn,), {"__module__": __name__})
    module_name, _, attribute = name.rpartition(".")
    if name in NUMPY_GLOBALS or module_name == "numpy.dtypes":  # numpy.dtypes.Float64DType and its kin
        module_name, attribute = NUMPY_GLOBALS.get(name, (module_name, attribute))
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            return None
    if module_name.startswith("torch.nn.modules."):
        try:
            candidate = getattr(importlib.import_module(module_name), attribute, None)
        except ImportError:
            return None
        if isinstance(candidate, type) and issubclass(candidate, nn.Module):
            return candidate
    return None
