"""Resumable training state: written by every rank, resumed with `--resume`.

Resumable state goes to `<output_dir>/checkpoints/step-<n>/` through `accelerator.save_state`
(model, optimizer and ZeRO shards, RNG states of every rank, registered objects), with `run.json`
(the run's config, ranks and ZeRO stage) beside it. Only when every rank has finished writing does
the main process point `checkpoints/latest` at it, by an atomic rename. A save never writes into
the folder `latest` points to (a second save at the same step gets `step-<n>-1`), so a kill or a
full disk during any save leaves the previous `latest` intact and usable.

Before `latest` moves, the main process writes `manifest.json`: every file's size and CRC-32, so that
a checkpoint damaged later (a copy between filesystems, a node crash under the page cache, bit rot)
is recognised before `--resume` loads it (`choose_resume`). Files the manifest does not list (a
converted copy written into the folder later) are not checked; a folder without a manifest was
written before manifests existed and resumes unchecked.

Portable weights (`best.pt`, `last.pt`) are a deployment artifact and live in `adyolo.weights`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list

from adyolo.engine.accelerator import any_rank
from adyolo.failures import InputError, WriteFailed

LATEST = "latest"
RUN_FILE = "run.json"  # what a resumed run must agree with: written beside each checkpoint
MANIFEST = "manifest.json"  # every file of a complete checkpoint: size and CRC-32
HASH_PART = 2**24  # bytes hashed as one piece: the pieces of a checkpoint are hashed in parallel
HASH_THREADS = 16
CHECKPOINT_NAME = re.compile(r"step-(\d+)(?:-(\d+))?")  # step-<n>, or step-<n>-<k> for the k-th save at step n
DAMAGED_PREFIX = "damaged-"  # a checkpoint found damaged and resumed around, kept under this name
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
    if not any_rank(accelerator, error is not None) and accelerator.is_main_process:
        # Every rank has written its part (the agreement above is a collective): list them, then move `latest`.
        try:
            write_manifest(target)
            _point_latest(root, target.name)
        except Exception as err:
            error = err
    if any_rank(accelerator, error is not None):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
        raise WriteFailed(write_failure(target, error, latest_folder(output_dir)))
    if accelerator.is_main_process:
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


def write_manifest(folder: Path) -> None:
    """`folder/manifest.json`: the size and CRC-32s of every file below `folder` (main process, after every
    rank has written)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    sizes = [p.stat().st_size for p in files]
    listed = {
        p.relative_to(folder).as_posix(): {"size": size, "crc32": crcs}
        for p, size, crcs in zip(files, sizes, _crc32s(files, sizes))
    }
    _write_atomically(folder / MANIFEST, json.dumps({"part_bytes": HASH_PART, "files": listed}, indent=1))


def _crc32s(files: list[Path], sizes: list[int], part: int = HASH_PART) -> list[list[str]]:
    """The CRC-32 of each `part`-byte piece of each file (a hash that finds flipped and lost bytes at
    memory speed), the pieces of all files on a pool of threads: zlib lets go of the GIL, so a save's
    hashing takes about 1/cores of one pass over its bytes."""

    def crc32(piece: tuple[Path, int]) -> str:
        path, offset = piece
        with path.open("rb") as file:
            file.seek(offset)
            return f"{zlib.crc32(file.read(part)):08x}"

    pieces = [(path, offset) for path, size in zip(files, sizes) for offset in range(0, max(size, 1), part)]
    with ThreadPoolExecutor(max(1, min(len(pieces), os.cpu_count() or 1, HASH_THREADS))) as pool:
        crcs = iter(pool.map(crc32, pieces))
    return [[next(crcs) for _ in range(0, max(size, 1), part)] for size in sizes]


def damage(folder: Path) -> str | None:
    """What is wrong with checkpoint `folder` by its manifest ("<file>: <what>"), or None when every file
    it lists is there as written. A folder without a manifest (written before manifests existed) is None:
    there is nothing to check it against."""
    if not folder.is_dir():
        return "the folder does not exist"
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        listed = {name: (int(f["size"]), list(f["crc32"])) for name, f in manifest["files"].items()}
        part = int(manifest["part_bytes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST}: unreadable ({type(err).__name__})"
    for name, (size, _) in listed.items():
        file = folder / name
        if not file.is_file():
            return f"{name}: missing"
        if file.stat().st_size != size:
            return f"{name}: {file.stat().st_size} bytes, {size} when written"
    found = _crc32s([folder / name for name in listed], [size for size, _ in listed.values()], part)
    for (name, (_, expected)), crcs in zip(listed.items(), found):
        if crcs != expected:
            return f"{name}: its content differs from when it was written (CRC-32)"
    return None


def _point_latest(root: Path, name: str) -> None:
    _write_atomically(root / LATEST, name + "\n")


def _prune(root: Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints (and `latest`); remove older ones and saves cut short."""
    latest = (root / LATEST).read_text().strip()
    kept = {p.name for p in complete_checkpoints(root)[:keep]} | {latest}
    for old in _checkpoints(root):
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders in `root` that a save finished, newest first: those with a manifest, and
    those older than every one with a manifest (written before manifests existed). A folder without one
    that is newer was a save cut short (a killed rank): `latest` never pointed at it."""
    folders = _checkpoints(root)
    listed = [p for p in folders if (p / MANIFEST).is_file()]
    if not listed:
        return folders
    return [p for p in folders if (p / MANIFEST).is_file() or _age(p) < _age(listed[-1])]


def roll_back_latest(output_dir: str | Path, before_step: int) -> Path | None:
    """Point `latest` at the newest complete checkpoint of a step before `before_step` (main process
    only); returns it, or None (and `latest` unchanged) when there is none."""
    root = checkpoint_root(output_dir)
    earlier = [p for p in complete_checkpoints(root) if step_of(p) < before_step]
    if not earlier:
        return None
    _point_latest(root, earlier[0].name)
    return earlier[0]


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


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run resumes from; when `latest` was damaged, which one and why (`tags` for MLflow)."""

    folder: Path
    damaged: Path | None = None
    why: str | None = None

    @property
    def tags(self) -> dict[str, str]:
        if self.damaged is None:
            return {}
        return {"resume.damaged": f"{self.damaged.name} ({self.why})", "resume.fallback": self.folder.name}

    def set_aside(self) -> None:
        """After a fall-back (main process, holding the run folder, every rank past `choose_resume`): the
        damaged checkpoint becomes `damaged-<name>`, kept for a look but no longer a checkpoint that pruning
        could keep in place of an intact one, and `latest` points at the checkpoint resumed from."""
        if self.damaged is None:
            return
        if self.damaged.is_dir():
            self.damaged.rename(self.damaged.with_name(f"{DAMAGED_PREFIX}{self.damaged.name}"))
        _point_latest(self.folder.parent, self.folder.name)


def choose_resume(resume: str, output_dir: str | Path, main_process: bool = True) -> Resumed:
    """The checkpoint `--resume` loads, checked against its manifest first (on every rank alike).

    `--resume` (latest) whose checkpoint is damaged resumes from the newest intact one, with a warning
    (from the main process), which is what an unattended requeue needs; `--resume <folder>` naming a
    damaged checkpoint raises `InputError` naming the file and the intact alternatives."""
    if resume == LATEST and (pointer := latest_folder(output_dir)) is not None and not pointer.is_dir():
        folder = pointer  # `latest` names a folder that is gone: damaged like any other
    else:
        folder = resolve_resume(resume, output_dir)
    why = damage(folder)
    if why is None:
        return Resumed(folder)
    root = folder.parent if resume != LATEST else checkpoint_root(output_dir)
    # Only checkpoints with a manifest count as intact: a folder without one may be a save cut short.
    others = [p for p in _checkpoints(root) if p != folder and (p / MANIFEST).is_file()]
    if resume == LATEST:
        fallback = next((p for p in others if damage(p) is None), None)
        if fallback is None:
            raise InputError(
                f"--resume: {folder} (checkpoints/latest) is damaged: {why}; no other checkpoint in {root} is intact. "
                "Start over with --exist-ok, or restore the run folder from a copy"
            )
        if main_process:
            print(
                f"warning: {folder} (checkpoints/latest) is damaged: {why}; resuming from {fallback.name}, the newest "
                f"intact checkpoint (the damaged one is kept as {DAMAGED_PREFIX}{folder.name})",
                file=sys.stderr,
                flush=True,
            )
        return Resumed(fallback, folder, why)
    intact = [p for p in others if damage(p) is None]
    alternatives = (
        f"intact: {', '.join(str(p) for p in intact)} (--resume <one of them>, or --resume alone for the newest)"
        if intact
        else f"no other checkpoint in {root} is intact"
    )
    raise InputError(f"--resume {resume}: the checkpoint is damaged: {why}; {alternatives}")


def _checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders in `root`, newest first: by step, then by the save's number at that step."""
    found = [p for p in root.glob("step-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=_age, reverse=True)


def _age(folder: Path) -> tuple[int, int]:
    """(step, the save's number at that step) of a `step-<n>` or `step-<n>-<k>` folder."""
    step, k = CHECKPOINT_NAME.fullmatch(folder.name).groups()
    return int(step), int(k or 0)


def read_run(folder: Path) -> dict | None:
    """The `run.json` saved beside a checkpoint (None for checkpoints written without one)."""
    path = folder / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
