"""Evaluate trained weights on a labelled image set: the work behind `launch/evaluate.py`.

Everything the user can get wrong (weights, sizes, folders, devices) is checked before any process
group exists or any image is predicted, and raises `InputError` with one line naming the argument and
the fix. Then every process predicts its shard of the images, the main process gathers them, scores
them (size-based difficulty, or the official WIDER FACE lists with `gt_mat`) and writes the report:
metrics.json, pr_curve.png, optionally the official prediction files and an MLflow run.

The processes come from the caller (`adyolo.engine.accelerator.InferenceProcesses`), so this package
never imports the training engine.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from adyolo.data.config import DataConfig
from adyolo.data.dataset import FaceDataset, build_loader, list_images
from adyolo.data.labels import LabelError, label_path_for
from adyolo.data.synthetic import ensure_synthetic_dataset
from adyolo.eval.evaluator import face_counts, official_predictions, official_score, predict, score
from adyolo.eval.subsets import score_subsets
from adyolo.eval.widerface.ground_truth import load_widerface_mat
from adyolo.eval.widerface.prediction_files import write_prediction_dir
from adyolo.eval.widerface.protocol import SETTINGS
from adyolo.predict.detector import resolve_device
from adyolo.schema import ConfigError, from_mapping
from adyolo.tracking import Tracker, tracking_uri
from adyolo.viz import plot_pr_curves
from adyolo.weights import WeightsError, load_weights

# Validation's score threshold during training: low, so that AP sees the whole precision-recall curve.
VAL_CONF_THRESHOLD = 0.02
NMS_IOU_THRESHOLD = 0.5
OFFICIAL_TXT_DIR = "widerface_txt"  # under the output folder, with --save-txt


class InputError(ValueError):
    """An argument that cannot work; the message names it and the fix."""


@dataclass
class EvaluationRequest:
    """What `launch/evaluate.py` asks for (its flags, same names)."""

    weights: str
    data: str | None = None  # None: the val split the weights were trained with
    img: int | None = None  # None: the size the weights were trained at
    batch: int = 16
    conf: float = VAL_CONF_THRESHOLD
    iou: float = NMS_IOU_THRESHOLD
    device: str | None = None  # None: each process's accelerator device
    workers: int = 2
    out: str | None = None  # None: runs/evaluate/<the weights' run folder name>
    gt_mat: str | None = None  # official eval_tools ground_truth/ folder
    mlflow: str | None = None  # None: no MLflow; "": the default store in `out`; else a tracking URI
    save_txt: bool = False  # also write the official prediction files


class Processes(Protocol):
    """The processes that share the evaluation (one or many)."""

    device: torch.device
    num_processes: int
    is_main_process: bool

    def main_process_first(self) -> contextlib.AbstractContextManager: ...
    def shard(self, loader: DataLoader) -> DataLoader: ...
    def gather(self, items: list) -> list: ...
    def close(self) -> None: ...


@dataclass
class Evaluation:
    metrics: dict[str, float]  # ap_easy, ap_medium, ap_hard, map50
    faces: dict[str, int]  # faces that count per setting
    images: int
    out: Path
    subsets: dict[str, float] = field(default_factory=dict)  # ap_tiny, and ap_<attribute> with attribute files
    subset_faces: dict[str, int] = field(default_factory=dict)


def evaluate_weights(request: EvaluationRequest, start: Callable[[bool], Processes]) -> Evaluation | None:
    """Check `request`, start the processes with `start(cpu)`, evaluate; the main process gets the
    result (and prints it), the others None. Raises `InputError` for bad input."""
    model, config, img_size = _check(request)
    try:
        processes = start(request.device == "cpu")
    except ValueError as err:
        raise InputError(str(err)) from None
    if request.device not in (None, "cpu") and processes.num_processes > 1:
        raise InputError("--device: under accelerate launch each process uses its own device; drop --device")
    device = processes.device if request.device in (None, "cpu") else resolve_device(request.device)
    problem = None
    # The main process (re)generates a missing synthetic split before the others list it; an error
    # is raised after the barrier so that no process waits forever for one that failed.
    with processes.main_process_first():
        try:
            source, images = resolve_data(request.data, config)
            dataset = FaceDataset(images, img_size)  # no augmentation: letterbox only, as validation
        except (InputError, LabelError) as err:
            problem = err
    if problem is not None:
        raise InputError(str(problem))

    loader = processes.shard(build_loader(dataset, request.batch, False, request.workers, seed=0))
    local = predict(
        model.to(device),
        loader,
        device,
        conf_threshold=request.conf,
        iou_threshold=request.iou,
        progress=processes.is_main_process,
    )
    gathered = processes.gather(local)  # every process's records; duplicates of the padding included
    processes.close()
    if not processes.is_main_process:
        return None
    if request.gt_mat:
        try:
            metrics, curves = official_score(gathered, load_widerface_mat(request.gt_mat))
        except ValueError as err:
            raise InputError(f"--gt-mat {request.gt_mat}: {err}") from None
        metrics["map50"] = score(gathered)[0]["map50"]  # mAP@0.5 does not depend on difficulty lists
    else:
        metrics, curves = score(gathered)
    out = Path(request.out) if request.out else Path("runs") / "evaluate" / Path(request.weights).resolve().parent.name
    subsets, subset_faces = score_subsets(gathered)
    result = Evaluation(metrics, face_counts(gathered), len(dataset), out, subsets, subset_faces)
    print(format_table(result))
    settings = {
        "weights": str(request.weights),
        "data": str(source),
        "images": len(dataset),
        "img_size": img_size,
        "conf": request.conf,
        "iou": request.iou,
        "difficulty": f"official ({request.gt_mat})" if request.gt_mat else "size",
        "processes": processes.num_processes,
    }
    write_report(request, result, settings, curves, official_predictions(gathered) if request.save_txt else None)
    return result


def _check(request: EvaluationRequest):
    """-> (model on CPU, its run config, the image size), or InputError before any work."""
    if request.batch < 1:
        raise InputError(f"--batch {request.batch}: must be at least 1")
    if request.workers < 0:
        raise InputError(f"--workers {request.workers}: must be 0 or more")
    if request.gt_mat is not None and not Path(request.gt_mat).is_dir():
        raise InputError(f"--gt-mat {request.gt_mat}: no such folder; pass eval_tools/ground_truth of WIDER FACE")
    try:
        model, config = load_weights(request.weights, "cpu")
        if request.device not in (None, "cpu"):
            resolve_device(request.device)
    except (WeightsError, ValueError) as err:
        raise InputError(str(err)) from None
    img_size = request.img or config["model"]["img_size"]
    stride = max(model.strides)
    if img_size < stride or img_size % stride:
        raise InputError(f"--img {img_size}: must be a positive multiple of the model's largest stride ({stride})")
    return model, config, img_size


def resolve_data(data: str | None, config: dict) -> tuple[Path, list[Path]]:
    """-> (the source, its images). Without `data`: the val split of the run the weights came from."""
    if data is None:
        try:
            data_cfg = from_mapping(DataConfig, config.get("data", {}), "data")
        except ConfigError as err:
            raise InputError(f"cannot find the val split from the weights' config ({err}); pass --data") from None
        if data_cfg.val is not None:
            source = Path(data_cfg.val)
        else:  # deterministic: regenerated identically if it was deleted
            source = ensure_synthetic_dataset(data_cfg.synthetic_root, data_cfg.synthetic)["val"]
        flag = f"the weights' val split {source}"
    else:
        source, flag = Path(data), f"--data {data}"
    try:
        images = list_images(source)
    except FileNotFoundError as err:
        raise InputError(f"{flag}: {err}; pass a folder of images with labels/ beside images/") from None
    if not any(label_path_for(p).is_file() for p in images):
        raise InputError(
            f"{flag}: none of the {len(images)} images has a label file (expected e.g. {label_path_for(images[0])}); "
            "evaluation needs YOLO-face labels in labels/ beside images/"
        )
    return source, images


def format_table(result: Evaluation) -> str:
    metrics, faces = result.metrics, result.faces
    header = f"{'':10}{'easy':>10}{'medium':>10}{'hard':>10}{'mAP@0.5':>10}"
    ap = f"{'AP':10}" + "".join(f"{metrics[f'ap_{s}']:>10.4f}" for s in SETTINGS) + f"{metrics['map50']:>10.4f}"
    counts = f"{'faces':10}" + "".join(f"{faces[s]:>10d}" for s in SETTINGS) + f"{faces['hard']:>10d}"
    subsets = [
        f"AP {name.removeprefix('ap_').replace('_', ' ')} {value:.4f} ({result.subset_faces[name[3:]]} faces)"
        for name, value in result.subsets.items()
    ]
    return "\n".join([header, ap, counts, f"({result.images} images)", *(["; ".join(subsets)] if subsets else [])])


def write_report(request: EvaluationRequest, result: Evaluation, settings: dict, curves, official) -> None:
    """metrics.json and pr_curve.png in the output folder; the official prediction files when `official`
    is given; an MLflow run when the request asks for one."""
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    record = {**settings, "metrics": result.metrics, "subsets": result.subsets, "subset_faces": result.subset_faces}
    metrics_path.write_text(json.dumps(record, indent=2))
    plot = plot_pr_curves(curves, out / "pr_curve.png")
    written = [metrics_path, plot]
    if official is not None:
        write_prediction_dir(out / OFFICIAL_TXT_DIR, official)
        written.append(out / OFFICIAL_TXT_DIR)
    print(f"-> {', '.join(map(str, written))}")
    if request.mlflow is None:
        return
    uri = tracking_uri(request.mlflow or None, out)
    tracker = Tracker(True, uri, "adyolo-evaluate", out, f"evaluate {out.name}")
    tracker.log_params(settings)
    logged = {**result.metrics, **{k: v for k, v in result.subsets.items() if math.isfinite(v)}}  # NaN: no face
    tracker.log_metrics({f"eval/{k}": v for k, v in logged.items()}, step=0)
    tracker.log_artifact(metrics_path)
    tracker.log_artifact(plot, "plots")
    tracker.finish()
    print(f"MLflow run {tracker.run_id} in {uri}")
