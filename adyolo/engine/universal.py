"""A ZeRO checkpoint resumed on another number of ranks, through DeepSpeed's universal checkpoint.

ZeRO-1/2/3 keep the optimizer state (the fp32 weights and the optimizer's moments) in one shard per
rank, so the shards of a checkpoint fit only the number of ranks that wrote them. On another number
of ranks, `--resume` converts the checkpoint once with DeepSpeed's own converter
(`deepspeed.checkpoint.ds_to_universal`: one file per parameter and state, whatever the ranks) into
`<output_dir>/checkpoints/universal/<checkpoint>/`, with hard links to Accelerate's other files of the
checkpoint beside it (the registered training state and EMA, the RNG states), where Accelerate's
`load_state` looks for them. DeepSpeed loads it with its `load_universal` flag on for that one load
only: a ZeRO-3 save with the flag on fails (DeepSpeed issue #7546). The original checkpoint is only
read and `latest` keeps pointing at it, so a conversion that fails leaves it resumable on the number
of ranks that wrote it. A requeued job that lands on the same new number of ranks reuses the
conversion; any other conversion in `checkpoints/universal/` is removed when a new one is made.

DeepSpeed's converter, and its ZeRO-3 universal load, read Adam's two moments only. SGD's momentum goes
through them as Adam's first moment: the converter reads copies of the optimizer shards that hold it as
`exp_avg` (zeros as `exp_avg_sq`), and after the load it is put back where SGD looks for it.

A universal load restores the parameters and the optimizer state; this module restores the rest:
the BatchNorm statistics (rank 0's, on every rank, as a ZeRO-1/2 checkpoint gives them) and, under
ZeRO-3, each parameter group's own hyperparameters (DeepSpeed gives every group the first group's,
which would put weight decay on BatchNorm weights and biases).

RNG: a rank whose index the checkpoint has a state for continues that stream; a new rank (more
ranks than wrote the checkpoint) keeps the stream it starts with, `train.seed` + its rank (as in a
fresh run).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from adyolo.engine.checkpoint import LOW_SPACE_BYTES, checkpoint_root, latest_folder, write_failure
from adyolo.failures import InputError, RunFailure, WriteFailed

UNIVERSAL = "universal"  # the folder under checkpoints/ that holds converted checkpoints
SOURCE_FILE = "source.json"  # what a converted folder was converted from; written last, when it is complete
ENGINE_TAG = "pytorch_model"  # the subfolder Accelerate's save_state gives the DeepSpeed engine's checkpoint


def needs_conversion(saved: dict | None, world_size: int) -> bool:
    """Whether a checkpoint (its `run.json`) holds ZeRO shards of another number of ranks than `world_size`."""
    return saved is not None and saved["zero_stage"] > 0 and saved["world_size"] != world_size


def check_convertible(folder: Path, saved: dict) -> None:
    """Before any process group: the shards a conversion reads are all there (one optimizer shard per
    rank that wrote the checkpoint, and the model states). Raises `InputError` naming what is missing."""
    shards = folder / ENGINE_TAG
    optimizer = sorted(p.name for p in shards.glob("*_optim_states.pt"))
    model = sorted(p.name for p in shards.glob("*_model_states.pt"))
    ranks, stage = saved["world_size"], saved["zero_stage"]
    if len(optimizer) != ranks or not model:
        found = f"{len(optimizer)} optimizer shard(s) and {len(model)} model state file(s)"
        raise InputError(
            f"--resume {folder}: a ZeRO-{stage} checkpoint of {ranks} ranks needs {ranks} optimizer shards "
            f"(*_optim_states.pt) and the model states in {shards} to be converted for another number of "
            f"ranks; found {found}. Resume another checkpoint (checkpoints/step-*), or start a new run"
        )


def load_state(accelerator: Accelerator, folder: Path, saved: dict | None, output_dir: str | Path) -> str:
    """`accelerator.load_state(folder)` on every rank; a ZeRO checkpoint of another number of ranks is
    converted first (once) and loaded from its conversion. Returns what was converted, for the start
    line ("" when the checkpoint was loaded as it is). Raises `InputError` (2) when the conversion
    fails, or `WriteFailed` (74) when the disk is full, on every rank."""
    if not needs_conversion(saved, accelerator.num_processes):
        accelerator.load_state(str(folder))
        return ""
    converted = checkpoint_root(output_dir) / UNIVERSAL / folder.name
    stage, sgd = saved["zero_stage"], saved["config"]["optim"]["optimizer"] == "sgd"
    source = {"checkpoint": str(folder.resolve()), "world_size": saved["world_size"], "zero_stage": stage}
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome = [_convert(folder, converted, source, sgd, accelerator.num_processes, output_dir)]
        except RunFailure as failure:
            outcome = [failure]
    broadcast_object_list(outcome)  # the others wait for the main process's conversion (or its failure)
    if isinstance(outcome[0], RunFailure):
        accelerator.wait_for_everyone()
        accelerator.end_training()  # every rank leaves the process group together: no abort at exit
        raise outcome[0]
    engine = accelerator.deepspeed_engine_wrapped.engine
    config, before = engine._config, engine._config.load_universal_checkpoint
    config.load_universal_checkpoint = True  # this load only: a ZeRO-3 save with it on fails
    try:
        accelerator.load_state(str(converted))
    finally:
        config.load_universal_checkpoint = before
    _restore_buffers(engine.module, converted / ENGINE_TAG)
    if stage == 3:
        _restore_group_hyperparameters(engine.optimizer.optimizer, converted / ENGINE_TAG)
    if sgd:
        for state in engine.optimizer.optimizer.state.values():  # one per flat partition of a parameter group
            state["momentum_buffer"] = state.pop("exp_avg")
            state.pop("exp_avg_sq", None)
            state.pop("step", None)
    how = f"converted in {outcome[0]:.1f} s" if outcome[0] is not None else "converted before"
    return f"its ZeRO-{stage} optimizer state {how}, in {converted}"


def _convert(folder: Path, converted: Path, source: dict, sgd: bool, world_size: int, output_dir) -> float | None:
    """Main process: the universal conversion of `folder` into `converted`; returns the seconds it took, or
    None when it was there already. Raises `InputError`, or `WriteFailed` on a full disk, with the reason."""
    if _source_of(converted) == source:
        return None  # converted before, e.g. by a requeued job on this number of ranks
    started = time.monotonic()
    parent = converted.parent
    partial = parent / f".{converted.name}.partial"
    try:
        if parent.is_dir():  # conversions of other checkpoints, and partial ones, are caches: dropped
            shutil.rmtree(parent)
        partial.mkdir(parents=True)
        convert_to_universal(folder / ENGINE_TAG, partial / ENGINE_TAG, source["zero_stage"], sgd)
        for file in folder.iterdir():
            if file.is_file():  # Accelerate's other files: training state, EMA, RNG states, run.json
                _link_or_copy(file, partial / file.name)
        (partial / SOURCE_FILE).write_text(json.dumps(source, indent=1))
        os.replace(partial, converted)
    except Exception as err:  # the converter asserts, raises OSError, RuntimeError (torch.save), KeyError...
        failure = _failure(folder, converted, source, world_size, err, output_dir)
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):
            parent.rmdir()  # nothing of a failed conversion is left (the folder held only caches)
        raise failure from None
    return time.monotonic() - started


def convert_to_universal(shards: Path, output: Path, stage: int, sgd: bool) -> None:
    """DeepSpeed's universal conversion of a ZeRO checkpoint's `shards` folder (`<checkpoint>/pytorch_model`)
    into `output`: `output/zero/<parameter>/{fp32,exp_avg,exp_avg_sq}.pt` whole tensors, whatever the ranks.
    `sgd`: the optimizer state is SGD's momentum, converted as `exp_avg` (`exp_avg_sq` zeros)."""
    from deepspeed.checkpoint import ds_to_universal  # here: runs without DeepSpeed never pay its import

    source = shards
    if sgd:
        source = output.parent / f".{output.name}.shards"
        _momentum_as_adam(shards, source, stage)
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(output),
        num_extract_workers=1,  # in this process: forked workers beside live threads (and a process group) hang
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # ZeRO-1/2 saves carry no `universal_checkpoint_info` for a model like this
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)  # its progress output: a line per step and tqdm bars
    finally:
        if source != shards:
            shutil.rmtree(source, ignore_errors=True)


def _momentum_as_adam(shards: Path, into: Path, stage: int) -> None:
    """Copies of the optimizer shards in `shards` with SGD's momentum as Adam's `exp_avg`, zeros as `exp_avg_sq`
    and a `step` (which ZeRO-3's universal load reads), the model states linked beside them, into `into`."""
    into.mkdir(parents=True)
    for path in shards.iterdir():
        if not path.name.endswith("_optim_states.pt"):
            _link_or_copy(path, into / path.name)
            continue
        shard = torch.load(path, map_location="cpu", weights_only=False)
        zero = shard["optimizer_state_dict"]
        if stage == 3:
            inner, flat = zero["optimizer_state_dict"], zero["fp32_flat_groups"]
        else:
            inner, flat = zero["base_optimizer_state"], zero["single_partition_of_fp32_groups"]
        for group, fp32 in enumerate(flat):
            state = inner["state"].setdefault(group, {})
            momentum = state.pop("momentum_buffer", None)  # None with momentum 0: nothing to carry
            state["exp_avg"] = torch.zeros_like(fp32) if momentum is None else momentum
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            state["step"] = torch.tensor(0.0)
        torch.save(shard, into / path.name)


def _failure(folder: Path, converted: Path, source: dict, world_size: int, err: Exception, output_dir) -> RunFailure:
    free = shutil.disk_usage(next(p for p in converted.parents if p.exists())).free
    if free < LOW_SPACE_BYTES or (isinstance(err, OSError) and err.errno == errno.ENOSPC):
        return WriteFailed(write_failure(converted, err, latest_folder(output_dir)))
    why = " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever the converter raised
    ranks, stage = source["world_size"], source["zero_stage"]
    return InputError(
        f"--resume {folder}: its ZeRO-{stage} optimizer state of {ranks} ranks could not be converted for "
        f"{world_size} ({why}); nothing was written into the checkpoint, which loads without conversion on "
        f"{ranks} ranks (accelerate launch --num_processes {ranks})"
    )


def _source_of(converted: Path) -> dict | None:
    try:
        return json.loads((converted / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no space, and the original is never written through it), or a copy across filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _model_states(shards: Path) -> Path:
    """Rank 0's model states: `mp_rank_00_model_states.pt` (ZeRO-1/2), `zero_pp_rank_0_...` (ZeRO-3)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (shards / name).is_file():
            return shards / name
    raise FileNotFoundError(f"no model states of rank 0 in {shards}")


@torch.no_grad()
def _restore_buffers(module: torch.nn.Module, shards: Path) -> None:
    """The checkpoint's buffers (BatchNorm statistics, rank 0's) into `module`: a universal load restores
    parameters only. ZeRO-3 partitions parameters, never buffers, so every rank holds them whole."""
    saved = torch.load(_model_states(shards), map_location="cpu", weights_only=False)["module"]
    parameters = {name for name, _ in module.named_parameters()}
    for name, tensor in module.state_dict(keep_vars=True).items():  # persistent buffers, as they were saved
        if name not in parameters:
            tensor.copy_(saved[name])


def _restore_group_hyperparameters(optimizer: torch.optim.Optimizer, shards: Path) -> None:
    """Each parameter group's own hyperparameters (weight decay, learning rate, betas, ...) from the
    converted optimizer state: DeepSpeed's ZeRO-3 universal load gives every group the first group's."""
    saved = torch.load(shards / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)["param_groups"]
    for group, hyper in zip(optimizer.param_groups, saved, strict=True):
        group.update({k: v for k, v in hyper.items() if k != "params"})


__all__ = ["check_convertible", "convert_to_universal", "load_state", "needs_conversion"]
