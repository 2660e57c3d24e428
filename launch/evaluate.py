"""Evaluate trained weights: WIDER FACE AP (easy / medium / hard) and mAP@0.5 on a labelled image set.

    python launch/evaluate.py --weights runs/default/best.pt                 # the val split it trained with
    python launch/evaluate.py --weights best.pt --data data/widerface/val/images --img 640 --out runs/eval/wf
    accelerate launch --config_file ds_configs/accelerate_ddp.yaml --num_processes 8 \\
        launch/evaluate.py --weights best.pt --data data/widerface/val/images --mlflow

--data is a folder of images (searched recursively) or a .txt list of image paths, with YOLO-face labels
in labels/ beside images/ (as launch/prepare_widerface.py and the synthetic dataset write them). The
difficulty settings count a face by its size (smaller side >= 32 px easy, >= 16 px medium, all hard), as
validation during training does; --gt-mat uses the official WIDER lists instead. Under
`accelerate launch` every process predicts its share of the images and the main process scores them.

Writes metrics.json and pr_curve.png to --out (default runs/evaluate/<name of the weights' run folder>);
--mlflow also logs them as an MLflow run (default store: sqlite in --out). Exit codes: 0 done, 2 bad
input (missing or foreign weights, no images, no labels, bad label line), before any image is predicted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adyolo.data.config import DataConfig
from adyolo.data.dataset import FaceDataset, build_loader, list_images
from adyolo.data.labels import LabelError, label_path_for
from adyolo.data.synthetic import ensure_synthetic_dataset
from adyolo.engine.accelerator import build_inference_accelerator, gather_objects
from adyolo.engine.checkpoint import WeightsError, load_weights
from adyolo.engine.tracking import Tracker, tracking_uri
from adyolo.eval.evaluator import SIZE_DIFFICULTY, _xywh_score, predict, score
from adyolo.eval.inference import resolve_device
from adyolo.eval.widerface_ap import SETTINGS, keep_by_size, load_widerface_mat, widerface_evaluate
from adyolo.schema import ConfigError, from_mapping
from adyolo.viz import plot_pr_curves


class InputError(ValueError):
    """An argument that cannot work; the message names it and the fix."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="best.pt / last.pt written by launch/train.py")
    parser.add_argument("--data", help="images to evaluate on (default: the val split the weights were trained with)")
    parser.add_argument("--img", type=int, help="network input size (default: the size the weights were trained at)")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass, per process (default 16)")
    parser.add_argument("--conf", type=float, default=0.02, help="score threshold (default 0.02, as in training)")
    parser.add_argument("--iou", type=float, default=0.5, help="NMS IoU threshold (default 0.5)")
    parser.add_argument("--device", help="cpu, or cuda[:i] for one process (default: each process's accelerator)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per process (default 2)")
    parser.add_argument("--out", help="output folder (default runs/evaluate/<the weights' run folder name>)")
    parser.add_argument("--gt-mat", help="official WIDER eval_tools ground_truth/ folder: official easy/medium/hard")
    parser.add_argument(
        "--mlflow", nargs="?", const="", metavar="URI", help="log to MLflow (default store: sqlite:///<out>/mlflow.db)"
    )
    return parser.parse_args()


def check_args(args: argparse.Namespace) -> None:
    if args.batch < 1:
        raise InputError(f"--batch {args.batch}: must be at least 1")
    if args.workers < 0:
        raise InputError(f"--workers {args.workers}: must be 0 or more")
    if args.gt_mat is not None and not Path(args.gt_mat).is_dir():
        raise InputError(f"--gt-mat {args.gt_mat}: no such folder; pass eval_tools/ground_truth of WIDER FACE")


def check_img_size(img_size: int, model) -> int:
    stride = max(model.strides)
    if img_size < stride or img_size % stride:
        raise InputError(f"--img {img_size}: must be a positive multiple of the model's largest stride ({stride})")
    return img_size


def resolve_data(data: str | None, config: dict) -> tuple[Path, list[Path]]:
    """-> (the source, its images). Without --data: the val split of the run the weights came from."""
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


def official_score(predictions, images_root: Path, gt_dir: str):
    """Score against the official WIDER difficulty lists: image id = "<event>/<file stem>"."""
    truth = load_widerface_mat(gt_dir)
    pred_xywh = {}
    for path, dets, _ in predictions:
        image_id = f"{Path(path).parent.name}/{Path(path).stem}"
        if image_id not in truth:
            raise InputError(f"--gt-mat {gt_dir}: image {path} (id {image_id}) is not in the official ground truth")
        pred_xywh[image_id] = _xywh_score(dets)
    curves = widerface_evaluate(pred_xywh, {k: truth[k] for k in pred_xywh})
    return {f"ap_{name}": float(curve.ap) for name, curve in curves.items()}, curves


def face_counts(predictions) -> dict[str, int]:
    """Faces that count in each setting (size-based), for the table."""
    unique = {path: gt for path, _, gt in predictions}
    counts = dict.fromkeys(SETTINGS, 0)
    for gt in unique.values():
        for name, keep in keep_by_size(gt, SIZE_DIFFICULTY).items():
            counts[name] += int(keep.sum())
    return counts


def format_table(metrics: dict[str, float], counts: dict[str, int], images: int) -> str:
    header = f"{'':10}{'easy':>10}{'medium':>10}{'hard':>10}{'mAP@0.5':>10}"
    ap = f"{'AP':10}" + "".join(f"{metrics[f'ap_{s}']:>10.4f}" for s in SETTINGS) + f"{metrics['map50']:>10.4f}"
    faces = f"{'faces':10}" + "".join(f"{counts[s]:>10d}" for s in SETTINGS) + f"{counts['hard']:>10d}"
    return "\n".join([header, ap, faces, f"({images} images)"])


def main() -> int:
    args = parse_args()
    try:
        check_args(args)
        model, config = load_weights(args.weights, "cpu")
        img_size = check_img_size(args.img or config["model"]["img_size"], model)
        if args.device not in (None, "cpu"):
            resolve_device(args.device)
    except (InputError, WeightsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    try:
        accelerator = build_inference_accelerator(cpu=args.device == "cpu")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.device not in (None, "cpu") and accelerator.num_processes > 1:
        print(
            "error: --device: under accelerate launch each process uses its own device; drop --device", file=sys.stderr
        )
        return 2
    device = accelerator.device if args.device in (None, "cpu") else resolve_device(args.device)
    problem = None
    # The main process (re)generates a missing synthetic split before the others list it; an error
    # is raised after the barrier so that no process waits forever for one that failed.
    with accelerator.main_process_first():
        try:
            source, images = resolve_data(args.data, config)
            dataset = FaceDataset(images, img_size)  # no augmentation: letterbox only, as validation
        except (InputError, LabelError) as err:
            problem = err
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    loader = accelerator.prepare(build_loader(dataset, args.batch, False, args.workers, seed=0))
    local = predict(model.to(device), loader, device, conf_threshold=args.conf, iou_threshold=args.iou)
    gathered = gather_objects(local)  # every process's (path, detections, truth); duplicates of padding included
    # The last collective. Every rank reaches it before any tears the process group down: a gloo rank
    # that exits while its peer still holds the group aborts at interpreter exit (3 runs in 8 on CPU).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return 0
    try:
        metrics, curves = official_score(gathered, source, args.gt_mat) if args.gt_mat else score(gathered)
        if args.gt_mat:  # mAP@0.5 does not depend on difficulty lists
            metrics["map50"] = score(gathered)[0]["map50"]
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(metrics, face_counts(gathered), len(dataset)))
    report(args, metrics, curves, source, len(dataset), img_size, accelerator.num_processes)
    return 0


def report(args, metrics, curves, source: Path, images: int, img_size: int, processes: int) -> None:
    """metrics.json and pr_curve.png in the output folder; an MLflow run when --mlflow is given."""
    out = Path(args.out) if args.out else Path("runs") / "evaluate" / Path(args.weights).resolve().parent.name
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "weights": str(args.weights),
        "data": str(source),
        "images": images,
        "img_size": img_size,
        "conf": args.conf,
        "iou": args.iou,
        "difficulty": f"official ({args.gt_mat})" if args.gt_mat else "size",
        "processes": processes,
    }
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps({**settings, "metrics": metrics}, indent=2))
    plot = plot_pr_curves(curves, out / "pr_curve.png")
    print(f"-> {metrics_path}, {plot}")
    if args.mlflow is None:
        return
    tracker = Tracker(True, tracking_uri(args.mlflow or None, out), "adyolo-evaluate", out, f"evaluate {out.name}")
    tracker.log_params(settings)
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    tracker.log_artifact(metrics_path)
    tracker.log_artifact(plot, "plots")
    tracker.finish()
    print(f"MLflow run {tracker.run_id} in {tracking_uri(args.mlflow or None, out)}")


if __name__ == "__main__":
    sys.exit(main())
