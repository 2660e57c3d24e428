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
--save-txt also the official prediction files (<out>/widerface_txt/<event>/<image>.txt, for WIDER FACE's
own evaluation tool); --mlflow logs them as an MLflow run (default store: sqlite in --out). Exit codes:
0 done, 2 bad input (missing or foreign weights, no images, no labels, bad label line), before any
image is predicted.
"""

from __future__ import annotations

import argparse
import sys

from adyolo.engine.accelerator import InferenceProcesses
from adyolo.eval.job import NMS_IOU_THRESHOLD, VAL_CONF_THRESHOLD, EvaluationRequest, InputError, evaluate_weights


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="best.pt / last.pt written by launch/train.py")
    parser.add_argument("--data", help="images to evaluate on (default: the val split the weights were trained with)")
    parser.add_argument("--img", type=int, help="network input size (default: the size the weights were trained at)")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass, per process (default 16)")
    parser.add_argument(
        "--conf", type=float, default=VAL_CONF_THRESHOLD, help="score threshold (default 0.02, as in training)"
    )
    parser.add_argument("--iou", type=float, default=NMS_IOU_THRESHOLD, help="NMS IoU threshold (default 0.5)")
    parser.add_argument("--device", help="cpu, or cuda[:i] for one process (default: each process's accelerator)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per process (default 2)")
    parser.add_argument("--out", help="output folder (default runs/evaluate/<the weights' run folder name>)")
    parser.add_argument("--gt-mat", help="official WIDER eval_tools ground_truth/ folder: official easy/medium/hard")
    parser.add_argument("--save-txt", action="store_true", help="also write WIDER FACE's official prediction files")
    parser.add_argument(
        "--mlflow", nargs="?", const="", metavar="URI", help="log to MLflow (default store: sqlite:///<out>/mlflow.db)"
    )
    return parser.parse_args()


def main() -> int:
    try:
        evaluate_weights(EvaluationRequest(**vars(parse_args())), InferenceProcesses)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
