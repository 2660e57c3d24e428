"""Detect faces (boxes + five landmarks) with trained weights in an image, a folder of images or a video.

    python launch/detect.py --weights runs/default/best.pt --source photo.jpg
    python launch/detect.py --weights best.pt --source photos/ --conf 0.3 --out runs/detect/party
    python launch/detect.py --weights best.pt --source clip.mp4 --device cuda

Writes to --out (default runs/detect/<source name>): the pictures with boxes and landmarks drawn,
and detections.json (per image: path, width, height, detections with box x1 y1 x2 y2, score and
landmarks [[x, y] x 5] in the original image's pixels; unreadable files of a folder under "skipped").
A video gives <name>.mp4 (annotated) and <name>.json with the detections of every frame.

Exit codes: 0 done, 2 bad input (missing or foreign weights, unreadable --source, no images),
before any model is run.
"""

from __future__ import annotations

import argparse
import sys

from adyolo.predict.job import DetectionRequest, InputError, detect


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="best.pt / last.pt written by launch/train.py")
    parser.add_argument("--source", required=True, help="an image, a folder of images (recursive) or a video")
    parser.add_argument("--out", help="output folder (default runs/detect/<source name>)")
    parser.add_argument("--img", type=int, help="network input size (default: the size the weights were trained at)")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.5, help="NMS IoU threshold (default 0.5)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    parser.add_argument("--batch", type=int, default=8, help="images (or video frames) per forward pass")
    return parser.parse_args()


def main() -> int:
    try:
        detect(DetectionRequest(**vars(parse_args())))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
