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

import os
from pathlib import Path

import yaml

from adyolo.config import RunConfig
from adyolo.data.dataset import build_datasets, build_loader
from adyolo.engine.accelerator import build_accelerator, launch_settings, rank_placement
from adyolo.engine.autobatch import probe_step
from adyolo.engine.checkpoint import TrainingState, resolve_resume
from adyolo.engine.setup import prepare_training, seeded_model
from adyolo.engine.trainer import Trainer, TrainerParts
from adyolo.model.summary import summarize
from adyolo.plan.auto import plan_run
from adyolo.schema import to_dict
from adyolo.tracking import Tracker, flatten, tracking_uri

# Where a Slurm job ran, for the MLflow run (slurm/train.sh).
SLURM_TAGS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME")


def build_run(cfg: RunConfig, resume: str | None = None) -> Trainer:
    """Everything a run needs, on this rank; `.fit()` trains it. `resume`: "latest" or a checkpoint
    folder, or None. Raises `ConfigError` / `BatchSplitError` before any process group or output exists."""
    # The memory plan resolves `auto` settings before the Accelerator fixes the gradient accumulation;
    # on a GPU a real probe step confirms a planned micro-batch.
    cfg, plan = plan_run(cfg, launch_settings(cfg.train), main_process=int(os.environ.get("RANK", "0")) == 0)
    auto_micro = plan is not None and "train.micro_batch" in plan.auto
    probe = probe_step(cfg.model, cfg.loss, cfg.optim, cfg.train) if auto_micro else None
    accelerator, split, precision, zero_stage = build_accelerator(cfg.train, cfg.optim, cfg.output_dir, probe)
    config_dict = to_dict(cfg)
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
        print(yaml.safe_dump(config_dict, sort_keys=False, default_flow_style=None), end="")
    accelerator.print(
        f"{split}; precision {precision}; "
        f"{'DeepSpeed ZeRO-' + str(zero_stage) if zero_stage else accelerator.distributed_type.name}"
    )

    # Data: the main process generates the synthetic default (if needed) before the others read it.
    with accelerator.main_process_first():
        train_set, val_set = build_datasets(cfg.data, cfg.model.img_size, cfg.train.seed)
    train_loader = build_loader(train_set, split.micro_batch, True, cfg.data.workers, cfg.train.seed, drop_last=True)
    val_loader = build_loader(val_set, split.micro_batch, False, cfg.data.workers, cfg.train.seed)

    # Model, identical on every rank; then its wrapping, loss, optimizer, EMA and training step.
    model = seeded_model(cfg.model, cfg.train.seed)
    summary = summarize(model, cfg.model.img_size)
    accelerator.print(summary)
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
    )
    state = TrainingState()
    accelerator.register_for_checkpointing(state, prepared.step.ema)
    if resume:
        folder = resolve_resume(resume, cfg.output_dir)
        accelerator.load_state(str(folder))
        accelerator.print(f"resumed from {folder}: epoch {state.epoch + 1}, step {state.step}")

    if plan is not None:
        plan.measure_baseline(prepared.step.weight_bytes())
        accelerator.print(plan.summary())
    placement = rank_placement(accelerator)
    tracker = Tracker(
        accelerator.is_main_process,
        tracking_uri(cfg.log.tracking_uri, cfg.output_dir),
        cfg.log.experiment,
        cfg.output_dir,
        cfg.log.run_name,
        state.mlflow_run_id,
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
            **(plan.params() if plan is not None else {}),
        }
    )
    slurm = {f"slurm.{k[6:].lower()}": os.environ[k] for k in SLURM_TAGS if k in os.environ}
    tracker.set_tags({**placement, **slurm, "distributed_type": accelerator.distributed_type.name})
    if accelerator.is_main_process:
        tracker.log_artifact(Path(cfg.output_dir) / "config.yaml")

    parts = TrainerParts(accelerator, prepared.step, prepared.train_loader, prepared.val_loader, state, tracker)
    return Trainer(parts, cfg.train, cfg.log, cfg.epochs, cfg.output_dir, config_dict, precision)
