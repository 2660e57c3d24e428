"""A training run assembled from its composed config: what `launch/train.py` starts.

`build_run(cfg, resume)` reads as the story of a run's start, on every rank:
the Accelerator (processes, precision, DeepSpeed, the batch split; a bad config stops here, before any
process group exists), the resolved config written and printed, the data (the main process generates
the synthetic default first), the model and its cost, the training objects prepared by Accelerate,
the resumed state, the MLflow run with what describes it. Each component receives only its own config
section; this is the one place that knows the whole `RunConfig`. First of all, the run's memory plan
(`adyolo.plan.auto`) resolves `auto` settings and predicts the per-rank memory that MLflow shows
beside the measured peaks.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml

from adyolo.config import RunConfig
from adyolo.data.dataset import build_datasets, build_loader, check_datasets
from adyolo.engine.accelerator import (
    build_accelerator,
    cpu_has_bf16,
    launch_settings,
    rank_placement,
    resolve_channels_last,
)
from adyolo.engine.autobatch import probe_step
from adyolo.engine.checkpoint import TrainingState, resolve_resume
from adyolo.engine.host_memory import keep_freed_memory
from adyolo.engine.noise import quiet_known_noise
from adyolo.engine.phases import PhaseTimes
from adyolo.engine.preflight import check_output_dir, check_resume, clear_previous_run, resumed_batches
from adyolo.engine.report import RunReport
from adyolo.engine.setup import prepare_training, seeded_model
from adyolo.engine.trainer import Trainer, TrainerParts
from adyolo.failures import InputError
from adyolo.init_weights import apply_init_weights, read_init_weights
from adyolo.model.summary import summarize
from adyolo.plan.auto import plan_run
from adyolo.schema import to_dict
from adyolo.tracking import Tracker, default_store_uri, flatten, tracking_uri

# Where a Slurm job ran, for the MLflow run (slurm/train.sh).
SLURM_TAGS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME")


def build_run(cfg: RunConfig, resume: str | None = None, exist_ok: bool = False) -> Trainer:
    """Everything a run needs, on this rank; `.fit()` trains it. `resume`: "latest" or a checkpoint
    folder, or None; `exist_ok`: start over in an output folder that holds a run. Raises `ConfigError`,
    `BatchSplitError` or `InputError` (the same on every rank) before any process group or output exists."""
    # The memory plan resolves `auto` settings before the Accelerator fixes the gradient accumulation;
    # on a GPU a real probe step confirms a planned micro-batch.
    # The setup phase of the run's time breakdown counts from the process's start (imports included).
    started = time.monotonic() - max(time.time() - psutil.Process().create_time(), 0.0)
    main_process = int(os.environ.get("RANK", "0")) == 0
    quiet_known_noise(main_process)
    keep_freed_memory()  # a CPU step would otherwise fault its activations in again every step
    settings = launch_settings(cfg.train)
    cfg = dataclasses.replace(
        cfg, train=resolve_channels_last(cfg.train, settings.precision, settings.deepspeed is not None)
    )

    # What can be checked without a process group is, on every rank alike and before anything costly:
    # the output folder, the checkpoint to resume, the user's data (read here once: every label file).
    check_output_dir(cfg.output_dir, resume, exist_ok)
    resume_folder = resolve_resume(resume, cfg.output_dir) if resume else None
    datasets = None
    if cfg.data.train is not None:
        datasets = build_datasets(cfg.data, cfg.model.img_size, cfg.train.seed)
        check_datasets(*datasets, cfg.train.global_batch)
    elif cfg.data.synthetic.num_train < cfg.train.global_batch:
        raise InputError(
            f"data.synthetic.num_train={cfg.data.synthetic.num_train} is fewer than train.global_batch="
            f"{cfg.train.global_batch}: an epoch would have no training step; raise one or lower the other"
        )
    # A resumed run's checkpoint holds its weights; otherwise the file to start from is read here, before
    # any costly work, so that a wrong one fails at once.
    init = read_init_weights(cfg.train.init_weights) if cfg.train.init_weights and not resume_folder else None
    cfg, plan = plan_run(cfg, settings, main_process=main_process)
    config_dict = to_dict(cfg)
    stage = settings.deepspeed.stage if settings.deepspeed else 0
    saved = check_resume(resume_folder, config_dict, settings.world_size, stage) if resume_folder else None

    auto_micro = plan is not None and "train.micro_batch" in plan.auto
    probe = probe_step(cfg.model, cfg.loss, cfg.optim, cfg.train) if auto_micro else None
    accelerator, split, precision, zero_stage = build_accelerator(cfg.train, cfg.optim, cfg.output_dir, probe)
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        if exist_ok and not resume:
            clear_previous_run(cfg.output_dir)
        (Path(cfg.output_dir) / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
        print(yaml.safe_dump(config_dict, sort_keys=False, default_flow_style=None), end="")
    how = precision_text(cfg.train, precision, deepspeed=zero_stage > 0)
    accelerator.print(f"{split}; {how}; {distribution(accelerator, zero_stage)}")
    phases = PhaseTimes(accelerator.device, cfg.log.phase_times, started)

    # Data: the main process generates the synthetic default (if needed) before the others read it.
    if datasets is None:
        with accelerator.main_process_first():
            datasets = build_datasets(cfg.data, cfg.model.img_size, cfg.train.seed)
    train_set, val_set = datasets
    accelerator.print(f"data: train {train_set.summary()}; val {val_set.summary()}")
    if cfg.data.cache:  # here, after every check: it reads every image (its size was checked with the data)
        for dataset in datasets:
            dataset.cache_images()
    train_loader = build_loader(train_set, split.micro_batch, True, cfg.data.workers, cfg.train.seed, drop_last=True)
    val_loader = build_loader(val_set, split.micro_batch, False, cfg.data.workers, cfg.train.seed)

    # Model, identical on every rank; then its wrapping, loss, optimizer, EMA and training step.
    model = seeded_model(cfg.model, cfg.train.seed)
    init_report = apply_init_weights(model, init) if init is not None else None
    summary = summarize(model, cfg.model.img_size)
    accelerator.print(summary)
    if init_report is not None:
        accelerator.print(init_report.describe())
    prepared = prepare_training(
        model,
        cfg.model,
        cfg.loss,
        cfg.optim,
        cfg.train,
        accelerator,
        split,
        zero_stage,
        cfg.epochs,
        train_loader=train_loader,
        val_loader=val_loader,
        phases=phases,
    )
    state = TrainingState()
    accelerator.register_for_checkpointing(state, prepared.step.ema)
    if resume_folder is not None:
        accelerator.load_state(str(resume_folder))
        state.batches_in_epoch = resumed_batches(saved, state.batches_in_epoch, split.micro_batch, split.world_size)
        other_ranks = saved is not None and saved["world_size"] != split.world_size
        moved = f" (written by {saved['world_size']} ranks)" if other_ranks else ""
        accelerator.print(f"resumed from {resume_folder}{moved}: epoch {state.epoch + 1}, step {state.step}")

    if plan is not None:
        plan.measure_baseline(prepared.step.weight_bytes())
        accelerator.print(plan.summary())
    placement = rank_placement(accelerator)
    uri = tracking_uri(cfg.log.tracking_uri, cfg.output_dir)
    tracker = Tracker(
        accelerator.is_main_process,
        uri,
        cfg.log.experiment,
        cfg.output_dir,
        cfg.log.run_name or run_name(cfg, split.world_size, accelerator.device.type, zero_stage),
        state.mlflow_run_id,
        system_metrics=cfg.log.system_metrics,
    )
    state.mlflow_run_id = tracker.run_id
    tracker.log_params(
        {
            **flatten(config_dict),
            "world_size": split.world_size,
            "zero_stage": zero_stage,
            "micro_batch": split.micro_batch,
            "accumulation": split.accumulation,
            "precision_resolved": precision,
            "checkpointed_blocks": ",".join(summary.checkpointed) or "none",
            "parameters": summary.parameters,
            "gflops": round(summary.gflops, 3),
            **data_params(train_set, val_set),
            **(plan.params() if plan is not None else {}),
            **(init_report.params() if init_report is not None else {}),
        }
    )
    slurm = {f"slurm.{k[6:].lower()}": os.environ[k] for k in SLURM_TAGS if k in os.environ}
    tracker.set_tags({**placement, **slurm, "distributed_type": accelerator.distributed_type.name})
    description = describe(cfg, split, precision, distribution(accelerator, zero_stage), summary)
    tracker.describe(description)
    if accelerator.is_main_process:
        tracker.log_artifact(Path(cfg.output_dir) / "config.yaml")
    report = RunReport(
        tracker,
        cfg.output_dir,
        accelerator.device.type,
        split.world_size,
        cfg.train.fitness,
        cfg.log.num_val_images,
        ui_command(uri, cfg.output_dir, tracker),
        description,
    )

    parts = TrainerParts(
        accelerator, prepared.step, prepared.train_loader, prepared.val_loader, state, tracker, report, phases
    )
    record = {
        "config": config_dict,
        "world_size": split.world_size,
        "micro_batch": split.micro_batch,
        "zero_stage": zero_stage,
    }
    return Trainer(parts, cfg.train, cfg.log, cfg.epochs, cfg.output_dir, record, precision)


def data_params(train_set, val_set) -> dict[str, int]:
    """What the datasets hold and what was dropped reading them, as MLflow parameters."""
    params = {}
    for split, dataset in (("train", train_set), ("val", val_set)):
        params.update(
            {
                f"data.{split}_images": len(dataset),
                f"data.{split}_faces": dataset.faces,
                f"data.{split}_skipped_label_lines": dataset.skipped_label_lines,
                f"data.{split}_dropped_boxes": dataset.dropped_boxes,
            }
        )
    return params


def precision_text(train, precision: str, deepspeed: bool = False) -> str:
    """The precision and memory format, and why where `auto` chose: "bf16 autocast (auto: ...), channels_last"."""
    text = "bf16 autocast" if precision == "bf16" else "fp32"
    if not torch.cuda.is_available() and not deepspeed:  # under DeepSpeed the precision is its JSON's
        if train.precision == "auto":
            why = "native bf16; train.precision=fp32 for fp32" if precision == "bf16" else "no native bf16"
            text += f" (auto: this CPU has {why})"
        elif precision == "fp32" and cpu_has_bf16():
            text += " (this CPU has native bf16: train.precision=bf16 trains faster)"
    return text + (", channels_last" if train.channels_last is True else "")


def distribution(accelerator, zero_stage: int) -> str:
    """How the ranks share the work, in words: "one process (cpu)", "DDP over 8 processes (cuda)", ..."""
    device = accelerator.device.type
    if zero_stage:
        return f"DeepSpeed ZeRO-{zero_stage} over {accelerator.num_processes} processes ({device})"
    if accelerator.num_processes > 1:
        return f"DDP over {accelerator.num_processes} processes ({device})"
    return f"one process ({device})"


def run_name(cfg: RunConfig, world_size: int, device_type: str, zero_stage: int) -> str:
    """What ran, as the MLflow run's name: e.g. `efficient-n-256px-1cpu`, `full-sdpa-s-640px-16gpu-zero2`,
    `yolov5face-s-640px-1gpu` (the baseline)."""
    fusion = cfg.model.variant.replace("/", "-")
    processes = f"{world_size}{'gpu' if device_type == 'cuda' else 'cpu'}"
    scheme = f"-zero{zero_stage}" if zero_stage else ("-ddp" if world_size > 1 else "")
    return f"{fusion}-{cfg.model.size}-{cfg.model.img_size}px-{processes}{scheme}"


def describe(cfg: RunConfig, split, precision: str, distribution_text: str, summary) -> str:
    """The MLflow run's description (Markdown), completed with the result at the end of the run."""
    data = cfg.data.train or f"synthetic ({cfg.data.synthetic.num_train} train / {cfg.data.synthetic.num_val} val)"
    return "\n".join(
        [
            (
                f"**YOLOv5-Face** (baseline: `model.neck=yolov5face`, PAN neck, 3 levels) size {cfg.model.size}"
                if cfg.model.neck == "yolov5face"
                else f"**ADYOLOv5-Face** size {cfg.model.size}, fusion {cfg.model.fusion}"
                + (f" ({cfg.model.attention} attention)" if cfg.model.fusion == "full" else "")
            )
            + f", {cfg.model.img_size} px, {summary.parameters / 1e6:.2f} M parameters, {summary.gflops:.1f} GFLOPs",
            f"- {cfg.epochs} epochs; {split}; {precision}; {distribution_text}",
            f"- data: {data}; best.pt chosen by {cfg.train.fitness}",
            f"- output: {Path(cfg.output_dir).resolve()}",
            "- read: `best/*` metrics (the epoch best.pt is from), `val/*` per epoch, `memory/<kind>/rank<r>` per rank;"
            " artifacts `best/` and `last/` hold the pictures of best.pt and last.pt, `weights/` both files",
        ]
    )


def ui_command(uri: str, output_dir: str | Path, tracker: Tracker) -> str:
    """How to open this run in the MLflow UI."""
    if uri != default_store_uri(output_dir):
        return f"{uri} (run {tracker.run_id})"
    python = Path(sys.executable)
    with_venv = os.path.relpath(python) if python.is_relative_to(Path.cwd()) else "python"
    return f"{with_venv} launch/ui.py {output_dir}   (then open the URL it prints)"
