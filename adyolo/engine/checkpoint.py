"""Checkpoints: resumable training state (every rank) and portable weights (`best.pt`, `last.pt`).

Resumable state goes to `<output_dir>/checkpoints/step-<n>/` through `accelerator.save_state`
(model, optimizer and ZeRO shards, RNG states of every rank, registered objects). Only when every
rank has finished writing does the main process point `checkpoints/latest` at it, by an atomic
rename, so a crash during a save leaves the previous `latest` intact and usable.

Portable weights hold the EMA state dict and the resolved run config, never a pickled module;
`load_weights` rebuilds the detector from them without DeepSpeed or accelerate.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from adyolo.model import build_model
from adyolo.schema import ConfigError

LATEST = "latest"


class TrainingState:
    """Counters that a resumed run must continue from; registered for checkpointing."""

    def __init__(self) -> None:
        self.epoch = 0  # epoch in progress
        self.step = 0  # optimizer steps taken
        self.batches_in_epoch = 0  # micro-batches of `epoch` already consumed
        self.best_fitness = -1.0
        self.evals_without_improvement = 0
        self.nonfinite_steps = 0  # micro-batches skipped for a non-finite loss, in total
        self.nonfinite_in_a_row = 0
        self.skipped_images = 0
        self.mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_resumable(accelerator, output_dir: str | Path, step: int, keep: int = 2) -> Path:
    """All ranks call this. Returns the checkpoint folder."""
    root = checkpoint_root(output_dir)
    target = root / f"step-{step:08d}"
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _point_latest(root, target.name)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return target


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep: int) -> None:
    latest = (root / LATEST).read_text().strip()
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in folders[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """`--resume latest` (or `--resume` alone) -> the folder `latest` points at; else the given path."""
    if resume == LATEST:
        pointer = checkpoint_root(output_dir) / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(
                f"--resume latest: no checkpoint in {pointer.parent} (no '{LATEST}' file); start without --resume"
            )
        folder = pointer.parent / pointer.read_text().strip()
    else:
        folder = Path(resume)
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume {resume}: checkpoint folder {folder} does not exist")
    return folder


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict, **extra: Any) -> None:
    """Atomically write {"model": state_dict (on CPU), "config": resolved run config, **extra}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = {"model": {k: v.detach().cpu() for k, v in state_dict.items()}, "config": config, **extra}
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
