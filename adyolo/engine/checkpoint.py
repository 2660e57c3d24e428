"""Resumable training state: written by every rank, resumed with `--resume`.

Resumable state goes to `<output_dir>/checkpoints/step-<n>/` through `accelerator.save_state`
(model, optimizer and ZeRO shards, RNG states of every rank, registered objects), with `run.json`
(the run's config, ranks and ZeRO stage) beside it. Only when every rank has finished writing does
the main process point `checkpoints/latest` at it, by an atomic rename. A save never writes into
the folder `latest` points to (a second save at the same step gets `step-<n>-1`), so a kill or a
full disk during any save leaves the previous `latest` intact and usable.

Portable weights (`best.pt`, `last.pt`) are a deployment artifact and live in `adyolo.weights`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list

from adyolo.engine.accelerator import any_rank
from adyolo.failures import InputError, WriteFailed

LATEST = "latest"
RUN_FILE = "run.json"  # what a resumed run must agree with: written beside each checkpoint
LOW_SPACE_BYTES = 64 * 2**20  # below this much free space, a failed write is named "disk full"


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
        self.bad_images: list[int] = []  # indices of the training images found unreadable, over all ranks
        self.mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_folder(output_dir: str | Path) -> Path | None:
    """The checkpoint folder `latest` points to, or None when there is none."""
    pointer = checkpoint_root(output_dir) / LATEST
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def save_resumable(accelerator, output_dir: str | Path, step: int, run: dict, keep: int = 2) -> Path:
    """All ranks call this. Returns the checkpoint folder; raises `WriteFailed` on every rank when any
    rank could not write its part (the partial folder is removed, `latest` is left as it was).
    `run`: what `check_resume` compares a resumed run with (config, world size, ZeRO stage)."""
    root = checkpoint_root(output_dir)
    name = [_free_name(root, step) if accelerator.is_main_process else ""]
    broadcast_object_list(name)  # one folder name for every rank, chosen where `latest` is known
    target = root / name[0]
    error = None
    try:
        accelerator.save_state(str(target))
        if accelerator.is_main_process:
            _write_atomically(target / RUN_FILE, json.dumps(run, indent=1, sort_keys=True))
    except Exception as err:  # a full disk is an OSError, a RuntimeError (torch.save), a SafetensorError...
        error = err
    if any_rank(accelerator, error is not None):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
        raise WriteFailed(write_failure(target, error, latest_folder(output_dir)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _point_latest(root, target.name)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return target


def _free_name(root: Path, step: int) -> str:
    """`step-<n>`, or `step-<n>-<k>` when that exists (`latest` may point to it: never write into it)."""
    name, k = f"step-{step:08d}", 0
    while (root / name).exists():
        k += 1
        name = f"step-{step:08d}-{k}"
    return name


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_failure(target: Path, error: BaseException | None, latest: Path | None) -> str:
    """The one line for a checkpoint or weights file that could not be written: by this rank (`error`)
    or by another (None); a full disk named as such; what is still there to resume."""
    free = shutil.disk_usage(target.parent if target.parent.exists() else ".").free
    full = free < LOW_SPACE_BYTES or (isinstance(error, OSError) and error.errno == errno.ENOSPC)
    if full:
        what = f"disk full ({free / 2**20:.0f} MiB free)"
    elif error is not None:
        what = f"{type(error).__name__}: {error}"
    else:
        what = "another rank could not write its part"
    kept = f"latest ({latest.name}) is intact" if latest is not None else "no earlier checkpoint exists"
    fix = "Free space (or copy the run folder elsewhere), then --resume" if latest else "Free space, then start again"
    return f"could not write {target}: {what}; {kept}. {fix}"


def _point_latest(root: Path, name: str) -> None:
    _write_atomically(root / LATEST, name + "\n")


def _prune(root: Path, keep: int) -> None:
    latest = (root / LATEST).read_text().strip()
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in folders[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def roll_back_latest(output_dir: str | Path, before_step: int) -> Path | None:
    """Point `latest` at the newest complete checkpoint of a step before `before_step` (main process
    only); returns it, or None (and `latest` unchanged) when there is none."""
    root = checkpoint_root(output_dir)
    complete = [p for p in root.glob("step-*") if (p / RUN_FILE).is_file() and step_of(p) < before_step]
    if not complete:
        return None
    newest = max(complete, key=lambda p: (step_of(p), p.name))
    _point_latest(root, newest.name)
    return newest


def step_of(folder: Path) -> int:
    """The optimizer step of a checkpoint folder: `step-<n>` or `step-<n>-<k>` -> n."""
    return int(folder.name.split("-")[1])


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """`--resume latest` (or `--resume` alone) -> the folder `latest` points at; else the given path.
    Raises `InputError` when there is nothing to resume."""
    if resume == LATEST:
        folder = latest_folder(output_dir)
        if folder is None:
            raise InputError(
                f"--resume: no checkpoint to resume in {checkpoint_root(output_dir)} (no '{LATEST}' file); "
                f"start without --resume, or give the run's output_dir="
            )
    else:
        folder = Path(resume)
    if not folder.is_dir():
        raise InputError(f"--resume {resume}: checkpoint folder {folder} does not exist")
    return folder


def read_run(folder: Path) -> dict | None:
    """The `run.json` saved beside a checkpoint (None for checkpoints written without one)."""
    path = folder / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
