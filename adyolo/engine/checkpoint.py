"""Resumable training state: written by every rank, resumed with `--resume`.

Resumable state goes to `<output_dir>/checkpoints/step-<n>/` through `accelerator.save_state`
(model, optimizer and ZeRO shards, RNG states of every rank, registered objects). Only when every
rank has finished writing does the main process point `checkpoints/latest` at it, by an atomic
rename, so a crash during a save leaves the previous `latest` intact and usable.

Portable weights (`best.pt`, `last.pt`) are a deployment artifact and live in `adyolo.weights`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

LATEST = "latest"


class TrainingState:
    """Counters that a resumed run must continue from; registered for checkpointing."""

    def __init__(self) -> None:
        self.epoch = 0  # epoch in progress
        self.step = 0  # optimizer steps taken
        self.batches_in_epoch = 0  # micro-batches of `epoch` already consumed
        self.best_fitness = -1.0
        self.best_epoch = 0  # the epoch (1-based) whose evaluation gave best.pt; 0: none yet
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
