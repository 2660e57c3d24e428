"""Portable weights: `best.pt` / `last.pt`, what detection, evaluation and export load.

A weights file holds {"model": the EMA state dict (CPU tensors), "config": the resolved run config,
"batch_norm_eps", plus epoch / step / best fitness}, never a pickled module: `load_weights` rebuilds
the detector from the config's model section, with neither DeepSpeed nor accelerate, and names what is
wrong with a file before building anything large.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from adyolo.model import build_model
from adyolo.model.blocks import BN_EPS
from adyolo.schema import ConfigError

# BatchNorm's eps is not in a state dict. Files written before it became YOLOv5's 1e-3 hold no
# "batch_norm_eps" and were trained with PyTorch's 1e-5: they load with that, unchanged.
BN_EPS_KEY, LEGACY_BN_EPS = "batch_norm_eps", 1e-5


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict, **extra: Any) -> None:
    """Atomically write {"model": state_dict (on CPU), "config": resolved run config, "batch_norm_eps", **extra}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = {"model": {k: v.detach().cpu() for k, v in state_dict.items()}, "config": config, BN_EPS_KEY: BN_EPS}
    payload.update(extra)
    torch.save(payload, tmp)
    os.replace(tmp, path)


class WeightsError(ValueError):
    """A weights file that cannot be used: missing, not an adyolo checkpoint, or weights of another model.
    The message is one line naming the file, what is wrong and what to pass instead."""


def load_weights(path: str | Path, device: str | torch.device = "cpu"):
    """-> (detector with the saved weights, in eval mode, on `device`; the run config dict it was trained with).

    Raises `WeightsError` before building anything large when the file is missing or unreadable, holds
    no adyolo payload, or its state dict does not fit the model its own config describes.
    """
    path = Path(path)
    payload = _read_payload(path, device)
    try:
        model = build_model(payload["config"]["model"])
    except ConfigError as err:
        raise WeightsError(f"{path}: its saved config is not valid for this version of adyolo ({err})") from None
    _check_state_dict(path, payload["model"], model.state_dict())
    model.load_state_dict(payload["model"])
    eps = float(payload.get(BN_EPS_KEY, LEGACY_BN_EPS))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = eps
    return model.to(device).eval(), payload["config"]


def _read_payload(path: Path, device: str | torch.device) -> dict[str, Any]:
    hint = "pass the best.pt or last.pt that launch/train.py wrote (e.g. runs/default/best.pt)"
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file; {hint}")
    try:
        # weights_only: a checkpoint from elsewhere must not run code; ours hold only tensors and plain data.
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types (pickle, zip, RuntimeError) for a foreign file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{path}: not a readable adyolo weights file ({reason[:200]}); {hint}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        found = sorted(map(str, payload))[:5] if isinstance(payload, dict) else type(payload).__name__
        raise WeightsError(f"{path}: not an adyolo weights file (no 'model' state dict; found {found}); {hint}")
    config = payload.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise WeightsError(f"{path}: no 'config' with a 'model' section beside the weights; {hint}")
    return payload


def _check_state_dict(path: Path, saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Name the keys that do not fit, rather than torch's multi-line strict-loading error."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    reshaped = [
        f"{k} {list(saved[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in saved and saved[k].shape != v.shape
    ]
    problems = [
        f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped))
        if keys
    ]
    if problems:
        raise WeightsError(
            f"{path}: the weights do not fit the model its config describes: {'; '.join(problems)}; "
            "these are weights of another model: pass weights saved by adyolo's launch/train.py"
        )
