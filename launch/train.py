"""Train ADYOLOv5-Face: one process, or many through `accelerate launch` (DDP or DeepSpeed ZeRO).

    python launch/train.py                                  # the embedded synthetic default
    accelerate launch --config_file ds_configs/accelerate_zero2.yaml launch/train.py \\
        --config launch/configs/widerface_s.yaml epochs=250
    accelerate launch ... launch/train.py --config run.yaml --resume        # continue from latest
    sbatch slurm/train.sh run.yaml                                          # many nodes (Slurm)

A bad config key, type or value stops every rank with the file, line and fix before any data is
loaded or any process group is used. Exit codes: 0 done, 2 bad config, 3 too many non-finite
losses (checkpoint saved), 75 stopped by SIGTERM/SIGUSR1 (checkpoint saved; rerun with --resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml
from accelerate.utils import set_seed

from adyolo.config import load_run_config
from adyolo.data.dataset import build_datasets, build_loader
from adyolo.engine.accelerator import build_accelerator
from adyolo.engine.autobatch import probe_step
from adyolo.engine.batching import BatchSplitError
from adyolo.engine.checkpoint import TrainingState, resolve_resume
from adyolo.engine.optim import Schedule
from adyolo.engine.setup import prepare_training
from adyolo.engine.tracking import Tracker, flatten, tracking_uri
from adyolo.engine.trainer import Trainer, TrainerParts, rank_placement
from adyolo.model import build_model
from adyolo.model.summary import summarize
from adyolo.schema import ConfigError, to_dict

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
# Where a Slurm job ran, for the MLflow run (slurm/train.sh).
SLURM_TAGS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="run YAML (default: the embedded synthetic default, launch/configs/default.yaml)",
    )
    parser.add_argument("--resume", nargs="?", const="latest", help="'latest' (default) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 model.size=n")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    try:
        cfg = load_run_config(args.config, args.overrides)
        accelerator, split, precision, zero_stage = build_accelerator(
            cfg.train,
            cfg.optim,
            cfg.output_dir,
            probe=lambda precision, device: probe_step(cfg.model, cfg.loss, cfg.model.img_size, precision, device),
        )
    except (ConfigError, BatchSplitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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

    # Model, identical on every rank; then its wrapping, loss, optimizer and EMA.
    set_seed(cfg.train.seed)
    model = build_model(cfg.model)
    summary = summarize(model, cfg.model.img_size)
    accelerator.print(summary)
    prepared = prepare_training(model, cfg, accelerator, split, zero_stage, (train_loader, val_loader))
    model, optimizer, loss_fn, ema = prepared.model, prepared.optimizer, prepared.loss_fn, prepared.ema
    train_loader, val_loader = prepared.loaders
    state = TrainingState()
    accelerator.register_for_checkpointing(state, ema)
    if args.resume:
        folder = resolve_resume(args.resume, cfg.output_dir)
        accelerator.load_state(str(folder))
        accelerator.print(f"resumed from {folder}: epoch {state.epoch + 1}, step {state.step}")

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
        }
    )
    slurm = {f"slurm.{k[6:].lower()}": os.environ[k] for k in SLURM_TAGS if k in os.environ}
    tracker.set_tags({**placement, **slurm, "distributed_type": accelerator.distributed_type.name})
    if accelerator.is_main_process:
        tracker.log_artifact(Path(cfg.output_dir) / "config.yaml")

    parts = TrainerParts(
        accelerator,
        model,
        optimizer,
        loss_fn,
        train_loader,
        val_loader,
        ema,
        Schedule(cfg.optim, len(train_loader) // split.accumulation, cfg.epochs),
        state,
        tracker,
    )
    code = Trainer(parts, cfg, precision, config_dict).fit()
    accelerator.end_training()
    return code


if __name__ == "__main__":
    sys.exit(main())
