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
import yaml

from adyolo.config import RunConfig
from adyolo.data.dataset import build_datasets, build_loader, check_datasets
from adyolo.engine.accelerator import Launch, build_accelerator, launch_settings, rank_placement, resolve_launch
from adyolo.engine.autobatch import agree_on_micro_batch, probe_step
from adyolo.engine.batching import GlobalBatchSampler
from adyolo.engine.checkpoint import TrainingState, choose_resume
from adyolo.engine.cuda_allocator import configure_cuda_allocator
from adyolo.engine.host_memory import keep_freed_memory
from adyolo.engine.noise import quiet_known_noise
from adyolo.engine.phases import PhaseTimes
from adyolo.engine.preflight import check_output_dir, check_resume, clear_previous_run, resumed_batches
from adyolo.engine.report import RunReport
from adyolo.engine.run_lock import hold_run_folder
from adyolo.engine.setup import TrainingConfigs, prepare_training, seeded_model
from adyolo.engine.trainer import Trainer, TrainerParts
from adyolo.engine.universal import load_state
from adyolo.failures import InputError
from adyolo.init_weights import apply_init_weights, read_init_weights
from adyolo.model.summary import summarize
from adyolo.plan.auto import plan_run
from adyolo.schema import to_dict
from adyolo.tracking import Tracker, check_tracking_server, default_store_uri, flatten, tracking_uri

# Where a Slurm job ran, for the MLflow run (slurm/train.sh).
SLURM_TAGS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME")


def build_run(cfg: RunConfig, resume: str | None = None, exist_ok: bool = False, force_unlock: bool = False) -> Trainer:
    """Everything a run needs, on this rank; `.fit()` trains it. `resume`: "latest" or a checkpoint
    folder, or None; `exist_ok`: start over in an output folder that holds a run; `force_unlock`: take the
    folder over from a run that left its lock. Raises `ConfigError`, `BatchSplitError` or `InputError`
    (the same on every rank) before any process group or output exists."""
    # The setup phase of the run's time breakdown counts from the process's start (imports included).
    started = time.monotonic() - max(time.time() - psutil.Process().create_time(), 0.0)
    main_process = int(os.environ.get("RANK", "0")) == 0
    allocator = configure_cuda_allocator(announce=main_process)  # before anything starts CUDA
    quiet_known_noise(main_process)
    keep_freed_memory()  # a CPU step would otherwise fault its activations in again every step

    # What can be checked without a process group is, on every rank alike and before anything costly:
    # the device (a GPU node whose GPUs torch cannot use stops here), the DeepSpeed JSON and precision,
    # the output folder (and that no other run writes it), the tracking server, the checkpoint to resume
    # (against its manifest), the user's data (read here once: every label file).
    settings = launch_settings(cfg.train, cfg.optim)
    check_output_dir(cfg.output_dir, resume, exist_ok, force_unlock)
    check_tracking_server(cfg.log.tracking_uri, cfg.output_dir)  # seconds, not MLflow's minutes of retries
    resumed = choose_resume(resume, cfg.output_dir, main_process) if resume else None
    resume_folder = resumed.folder if resumed else None
    datasets = None
    if cfg.data.train is not None:
        datasets = build_datasets(cfg.data, cfg.model.img_size, cfg.train.seed, settings.local_world_size)
        check_datasets(*datasets, cfg.train.global_batch)
    elif cfg.data.synthetic.num_train < cfg.train.global_batch:
        raise InputError(
            f"data.synthetic.num_train={cfg.data.synthetic.num_train} is fewer than train.global_batch="
            f"{cfg.train.global_batch}: an epoch would have no training step; raise one or lower the other"
        )
    # A resumed run's checkpoint holds its weights; otherwise the file to start from is read here, before
    # any costly work, so that a wrong one fails at once.
    init = read_init_weights(cfg.train.init_weights) if cfg.train.init_weights and not resume_folder else None
    # The memory plan resolves `auto` settings (every rank alike) before the Accelerator fixes the split.
    cfg, plan = plan_run(cfg, settings, main_process=main_process)
    launch = resolve_launch(settings, cfg.train)
    check_single_image_steps(cfg, launch)
    saved = (
        check_resume(resume_folder, to_dict(cfg), launch.split.world_size, launch.zero_stage) if resume_folder else None
    )

    accelerator = build_accelerator(launch, cfg.train.timeout_s, cfg.output_dir)
    hold_run_folder(accelerator, cfg.output_dir, force_unlock)  # one writer per run folder, from here on
    if resumed is not None and accelerator.is_main_process:
        resumed.set_aside()  # a damaged `latest` resumed around
    if settings.device == "cuda" and plan is not None and "train.micro_batch" in plan.auto:
        # On a GPU a real step confirms the planned micro-batch on every rank; all take the smallest.
        fits = probe_step(cfg.model, cfg.loss, cfg.optim, cfg.train, launch.precision, accelerator.device)
        launch = agree_on_micro_batch(accelerator, launch, fits)
    cfg = resolved(cfg, launch)
    config_dict = to_dict(cfg)
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        if exist_ok and not resume:
            clear_previous_run(cfg.output_dir)
        text = f"# launch: {launch.text()}\n" + yaml.safe_dump(config_dict, sort_keys=False)
        (Path(cfg.output_dir) / "config.yaml").write_text(text)
        print(yaml.safe_dump(config_dict, sort_keys=False, default_flow_style=None), end="")
    accelerator.print(launch.text())
    phases = PhaseTimes(accelerator.device, cfg.log.phase_times, started)

    # Data: the main process generates the synthetic default (if needed) before the others read it.
    if datasets is None:
        with accelerator.main_process_first():
            datasets = build_datasets(cfg.data, cfg.model.img_size, cfg.train.seed, settings.local_world_size)
    train_set, val_set = datasets
    accelerator.print(f"data: train {train_set.summary()}; val {val_set.summary()}")
    if cfg.data.cache:  # here, after every check: it reads every image (its size was checked with the data)
        for dataset in datasets:
            dataset.cache_images()
    sampler = GlobalBatchSampler(len(train_set), launch.split, accelerator.process_index, cfg.train.seed)
    train_loader = build_loader(train_set, None, True, cfg.data.workers, cfg.train.seed, batch_sampler=sampler)
    val_loader = build_loader(val_set, launch.split.micro_batch, False, cfg.data.workers, cfg.train.seed)

    # Model, identical on every rank; then its wrapping, loss, optimizer, EMA and training step.
    model = seeded_model(cfg.model, cfg.train.seed)
    init_report = apply_init_weights(model, init) if init is not None else None
    summary = summarize(model, cfg.model.img_size)
    accelerator.print(summary)
    if init_report is not None:
        accelerator.print(init_report.describe())
    configs = TrainingConfigs(cfg.model, cfg.loss, cfg.optim, cfg.train)
    prepared = prepare_training(
        model, configs, accelerator, launch, cfg.epochs, train_loader=train_loader, val_loader=val_loader, phases=phases
    )
    state = TrainingState()
    accelerator.register_for_checkpointing(state, prepared.step.ema)
    if resume_folder is not None:
        converted = load_state(accelerator, resume_folder, saved, cfg.output_dir)  # ZeRO of other ranks: converted
        # Checkpoints lie between optimizer steps, and Accelerate restores its count of a window's micro-batches
        # from the rank that saved it (a new rank has none): every rank starts the window afresh.
        accelerator.step = 0
        state.batches_in_epoch = resumed_batches(saved, state.batches_in_epoch, launch.split)
        other_ranks = saved is not None and saved["world_size"] != launch.split.world_size
        moved = f" (written by {saved['world_size']} ranks{converted and '; ' + converted})" if other_ranks else ""
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
        cfg.log.run_name or run_name(cfg, launch),
        state.mlflow_run_id,
        system_metrics=cfg.log.system_metrics,
    )
    state.mlflow_run_id = tracker.run_id
    tracker.log_params(
        {
            **flatten(config_dict),
            **launch.params(),
            "checkpointed_blocks": ",".join(summary.checkpointed) or "none",
            "parameters": summary.parameters,
            "gflops": round(summary.gflops, 3),
            **data_params(train_set, val_set),
            **(plan.params() if plan is not None else {}),
            **allocator.params(),
            **(init_report.params() if init_report is not None else {}),
        }
    )
    slurm = {f"slurm.{k[6:].lower()}": os.environ[k] for k in SLURM_TAGS if k in os.environ}
    resume_tags = resumed.tags if resumed else {}  # which checkpoint, when `latest` was damaged
    tracker.set_tags({**placement, **slurm, **resume_tags, "distributed_type": accelerator.distributed_type.name})
    description = describe(cfg, launch, summary)
    tracker.describe(description)
    if accelerator.is_main_process:
        tracker.log_artifact(Path(cfg.output_dir) / "config.yaml")
    report = RunReport(
        tracker,
        cfg.output_dir,
        accelerator.device.type,
        launch.split.world_size,
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
        "world_size": launch.split.world_size,
        "micro_batch": launch.split.micro_batch,
        "accumulation": launch.split.accumulation,
        "zero_stage": launch.zero_stage,
    }
    return Trainer(parts, cfg.train, cfg.log, cfg.epochs, cfg.output_dir, record, launch.precision)


def check_single_image_steps(cfg: RunConfig, launch: Launch) -> None:
    """A micro-batch of one image trains only where the smallest map is larger than 1x1: train-mode
    BatchNorm needs more than one value per channel (at 64 px High-GD's map of one image is 1x1)."""
    smallest_map = -(-cfg.model.img_size // cfg.model.coarsest_stride)
    if launch.split.smallest_micro_batch == 1 and smallest_map == 1:
        raise InputError(
            f"{launch.split} has micro-batches of one image, which cannot train at model.img_size="
            f"{cfg.model.img_size}: the smallest map is 1x1 and BatchNorm needs two values per channel; use "
            f"model.img_size >= {cfg.model.coarsest_stride + 32} or a split with at least two "
            "images per micro-batch (train.global_batch, train.micro_batch or fewer processes)"
        )


def resolved(cfg: RunConfig, launch: Launch) -> RunConfig:
    """The config with what the launch decided in place of `auto`: precision, channels_last and the
    micro-batch (the plan's, confirmed by the probe on a GPU). What config.yaml and MLflow record."""
    micro = launch.split.micro_batch if cfg.train.micro_batch is not None else None
    train = dataclasses.replace(
        cfg.train, precision=launch.precision, channels_last=launch.channels_last, micro_batch=micro
    )
    return dataclasses.replace(cfg, train=train)


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


def run_name(cfg: RunConfig, launch: Launch) -> str:
    """What ran, as the MLflow run's name: e.g. `efficient-n-256px-1cpu`, `full-sdpa-s-640px-16gpu-zero2`,
    `yolov5face-s-640px-1gpu` (the baseline); an uneven split adds it, e.g. `-16gpu-40=8x3+8x2-zero2`."""
    fusion = cfg.model.variant.replace("/", "-")
    split, zero = launch.split, launch.zero_stage
    processes = f"{split.world_size}{'gpu' if launch.settings.device == 'cuda' else 'cpu'}"
    if split.world_size > 1 and split.global_batch % split.world_size:
        processes += f"-{split.global_batch}=" + "+".join(f"{n}x{images}" for n, images in split.shares())
    scheme = f"-zero{zero}" if zero else ("-ddp" if split.world_size > 1 else "")
    return f"{fusion}-{cfg.model.size}-{cfg.model.img_size}px-{processes}{scheme}"


def describe(cfg: RunConfig, launch: Launch, summary) -> str:
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
            f"- {cfg.epochs} epochs; {launch.text()}",
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
