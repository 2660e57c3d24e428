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
import json
import sys
from pathlib import Path

import cv2
import torch
from tqdm import tqdm

from adyolo.data.dataset import list_images
from adyolo.engine.checkpoint import WeightsError, load_weights
from adyolo.eval.inference import Detector, batched, detections_to_json, is_video, resolve_device
from adyolo.viz import draw_detections


class SourceError(ValueError):
    """--source cannot be used; the message says why and what to pass."""


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


def check_source(source: str) -> tuple[str, list[Path]]:
    """-> (kind: image | folder | video, the files); raises SourceError for a source that cannot work."""
    path = Path(source)
    if not path.exists():
        raise SourceError(f"--source {source}: no such file or folder; pass an image, a folder of images or a video")
    if path.is_dir():
        try:
            return "folder", list_images(path)
        except FileNotFoundError as err:
            raise SourceError(f"--source {err}; pass a folder that holds images") from None
    if is_video(path):
        capture = cv2.VideoCapture(str(path))
        readable = capture.isOpened() and capture.read()[0]
        capture.release()
        if not readable:
            raise SourceError(f"--source {source}: cannot read a frame of this video (corrupt or unsupported codec)")
        return "video", [path]
    if cv2.imread(str(path), cv2.IMREAD_COLOR) is None:
        raise SourceError(f"--source {source}: not a readable image (missing, empty, corrupt or not an image format)")
    return "image", [path]


def detect_images(detector: Detector, paths: list[Path], root: Path, out: Path, batch: int) -> dict:
    """Annotated copies under `out` (same relative paths as under `root`) and the JSON record."""
    records, skipped = [], []
    with tqdm(total=len(paths), desc="detect", unit="img", disable=len(paths) == 1) as bar:
        for chunk in batched(paths, batch):
            images, kept = [], []
            for path in chunk:
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if image is None:  # one bad file must not end a long folder run
                    tqdm.write(f"warning: skipping unreadable image {path}", file=sys.stderr)
                    skipped.append(str(path))
                else:
                    images.append(image)
                    kept.append(path)
            for path, image, dets in zip(kept, images, detector(images)):
                target = out / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(target), draw_detections(image, dets))
                height, width = image.shape[:2]
                records.append(
                    {"path": str(path), "width": width, "height": height, "detections": detections_to_json(dets)}
                )
            bar.update(len(chunk))
    return {"images": records, "skipped": skipped}


def detect_video(detector: Detector, path: Path, out: Path, batch: int) -> tuple[dict, Path]:
    """The annotated video (mp4) and per-frame detections."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0  # some containers do not store it
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    target = out / f"{path.stem}.mp4"
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    frames = []

    def read_frames():
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame

    try:
        with tqdm(total=total, desc="detect", unit="frame") as bar:
            for chunk in batched(read_frames(), batch):
                for frame, dets in zip(chunk, detector(chunk)):
                    writer.write(draw_detections(frame, dets))
                    frames.append(
                        {
                            "frame": len(frames),
                            "time_s": round(len(frames) / fps, 4),
                            "detections": detections_to_json(dets),
                        }
                    )
                bar.update(len(chunk))
    finally:
        capture.release()
        writer.release()
    record = {"path": str(path), "width": width, "height": height, "fps": fps, "frames": frames}
    return record, target


def main() -> int:
    args = parse_args()
    try:
        if args.batch < 1:
            raise SourceError(f"--batch {args.batch}: must be at least 1")
        kind, paths = check_source(args.source)
        device = resolve_device(args.device)
        model, cfg = load_weights(args.weights, device)
        img_size = args.img or cfg["model"]["img_size"]
        detector = Detector(model, img_size, args.conf, args.iou, device)
    except (SourceError, WeightsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    source = Path(args.source)
    out = Path(args.out) if args.out else Path("runs") / "detect" / (source.stem or "source")
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "weights": str(args.weights),
        "source": str(source),
        "img_size": img_size,
        "conf": args.conf,
        "iou": args.iou,
    }
    if kind == "video":
        record, video = detect_video(detector, paths[0], out, args.batch)
        json_path = out / f"{source.stem}.json"
        json_path.write_text(json.dumps({**settings, "video": record}, indent=1))
        count = sum(len(f["detections"]) for f in record["frames"])
        print(f"{len(record['frames'])} frames, {count} faces -> {video}, {json_path}")
        return 0
    root = source if kind == "folder" else source.parent
    result = detect_images(detector, paths, root, out, args.batch)
    json_path = out / "detections.json"
    json_path.write_text(json.dumps({**settings, **result}, indent=1))
    count = sum(len(r["detections"]) for r in result["images"])
    skipped = f", {len(result['skipped'])} unreadable skipped" if result["skipped"] else ""
    print(f"{len(result['images'])} images, {count} faces{skipped} -> {out}/ ({json_path.name})")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
