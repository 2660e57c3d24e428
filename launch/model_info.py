"""Build the detector from a run config, report its size and cost, and time one training step on it.

    python launch/model_info.py                                   # the default: size s, full/sdpa
    python launch/model_info.py --config launch/configs/model/adyolo_s_efficient.yaml
    python launch/model_info.py model.size=n model.checkpoint=[all] --batch 2
    python launch/model_info.py model.neck=yolov5face            # the YOLOv5s-face baseline (3 levels)

Prints the resolved model config, parameters and GFLOPs at the configured size, then one optimizer step
(`TrainStep`: forward, the detection loss, backward, optimizer and EMA update) on a synthetic batch on
the CPU, with the output shapes, the loss terms and the wall time.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
import yaml

from adyolo.config import RunConfig, load_model_config, load_run_config
from adyolo.data.batch import synthetic_batch
from adyolo.engine.setup import bare_step
from adyolo.model.summary import summarize
from adyolo.schema import ConfigError, to_dict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run YAML (with a model: section) or a model YAML")
    parser.add_argument("--batch", type=int, default=1, help="images in the timed step")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.size=n")
    args = parser.parse_args()
    try:
        if args.config and not args.overrides:
            cfg = RunConfig(model=load_model_config(args.config))
        else:
            cfg = load_run_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump({"model": to_dict(cfg.model)}, sort_keys=False, default_flow_style=None), end="")

    step = bare_step(cfg.model, cfg.loss, cfg.optim, cfg.train, torch.device("cpu"))
    model = step.model
    print(summarize(model, cfg.model.img_size))
    start = time.perf_counter()
    window = step.run_window(itertools.repeat(synthetic_batch(args.batch, cfg.model.img_size)), step=0)
    elapsed = time.perf_counter() - start
    size = cfg.model.img_size
    shapes = ", ".join(
        str((args.batch, model.head.num_anchors, size // s, size // s, model.head.num_outputs)) for s in model.strides
    )
    losses = ", ".join(f"{k} {v:.4f}" for k, v in window.losses().items())
    print(f"strides {model.strides}; outputs {shapes}")
    print(
        f"one optimizer step at batch {args.batch}: {elapsed:.2f} s on {torch.get_num_threads()} CPU threads; {losses}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
