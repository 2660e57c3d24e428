"""Checks of a run's output folder and of what it resumes, made before any process group exists or
any output is written, so that a mistake costs seconds and leaves nothing behind (exit code 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

from adyolo.engine.batching import BatchSplit
from adyolo.engine.checkpoint import latest_folder, read_run
from adyolo.engine.run_lock import check_not_in_use
from adyolo.engine.universal import check_convertible, needs_conversion
from adyolo.failures import InputError
from adyolo.model.config import ModelConfig
from adyolo.schema import ConfigError, from_mapping, to_dict

# What a started run leaves in its output folder; a folder holding any of these holds a run.
RUN_OUTPUTS = ("checkpoints", "best.pt", "last.pt", "results.csv")
STALE_OUTPUTS = (*RUN_OUTPUTS, "results.png", "pictures")  # removed by --exist-ok


def check_output_dir(output_dir: str | Path, resume: str | None, exist_ok: bool, force_unlock: bool = False) -> None:
    """A folder that another live run writes is left to it (`adyolo.engine.run_lock`); one that holds a
    run is continued (`--resume`) or restarted on purpose (`--exist-ok`), never overwritten by accident."""
    check_not_in_use(output_dir, force_unlock)
    folder = Path(output_dir)
    found = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    if not found or resume or exist_ok:
        return
    latest = latest_folder(folder)
    held = f"checkpoints/latest -> {latest.name}" if latest is not None else ", ".join(found)
    raise InputError(
        f"output_dir={folder} already holds a run ({held}); continue it with --resume, start it over in "
        f"place with --exist-ok, or choose another output_dir="
    )


def clear_previous_run(output_dir: str | Path) -> None:
    """`--exist-ok`: remove the previous run's checkpoints, weights and results (its MLflow run stays
    in the store, beside the new one). Main process only."""
    folder = Path(output_dir)
    for name in STALE_OUTPUTS:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def with_defaults(model: dict) -> dict:
    """A saved model section with the keys added since it was written at their defaults (a checkpoint
    from before `model.neck` existed is a GD model); as saved if it no longer parses."""
    try:
        return to_dict(from_mapping(ModelConfig, model, "model"))
    except ConfigError:
        return model


def check_resume(folder: Path, config: dict, world_size: int, zero_stage: int) -> dict | None:
    """Whether the checkpoint in `folder` can continue this run; raises `InputError` naming what differs
    and what to do. Returns the checkpoint's `run.json` (None when it has none: nothing to compare)."""
    saved = read_run(folder)
    if saved is None:
        return None
    before, now = with_defaults(saved["config"]["model"]), with_defaults(config["model"])
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        diff = ", ".join(f"model.{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise InputError(
            f"--resume {folder}: the checkpoint holds another model ({diff}); resume with the same model "
            f"settings (its config: {folder.parent.parent / 'config.yaml'}), or start a new run"
        )
    if saved["config"]["train"]["global_batch"] != config["train"]["global_batch"]:
        raise InputError(
            f"--resume {folder}: train.global_batch was {saved['config']['train']['global_batch']}, now "
            f"{config['train']['global_batch']}; the schedule and the epoch position count its steps: keep it"
        )
    ranks, stage = saved["world_size"], saved["zero_stage"]
    describe = {0: "a DDP / one-process checkpoint"}.get(stage, f"a ZeRO-{stage} checkpoint")
    if stage != zero_stage:
        now_text = f"ZeRO-{zero_stage}" if zero_stage else "without DeepSpeed"
        raise InputError(
            f"--resume {folder}: {describe} of {ranks} rank(s) cannot be resumed {now_text}: the optimizer "
            f"state is stored in another layout; launch with the accelerate config it was written with "
            f"(ZeRO stage {stage}, {ranks} processes)"
        )
    if needs_conversion(saved, world_size):  # loaded through DeepSpeed's universal checkpoint (engine/universal.py)
        check_convertible(folder, saved)
    return saved


def resumed_batches(saved: dict | None, batches_in_epoch: int, split: BatchSplit) -> int:
    """The epoch position of a checkpoint (micro-batches of one rank) for this job's split: the same
    optimizer steps, so the same images, into the epoch, whatever the ranks and accumulation. A checkpoint
    lies between optimizer steps."""
    if saved is None:
        return batches_in_epoch
    accumulation = saved.get("accumulation")
    if accumulation is None:  # written before run.json kept it: splits were even then
        accumulation = saved["config"]["train"]["global_batch"] // (saved["micro_batch"] * saved["world_size"])
    return batches_in_epoch // accumulation * split.accumulation


__all__ = ["check_output_dir", "check_resume", "clear_previous_run", "resumed_batches"]
