"""Build the detector from a run config, report its size and cost, and run one training step on it.

    python launch/model_info.py                                   # the default: size s, full/sdpa
    python launch/model_info.py --config launch/configs/model/adyolo_s_efficient.yaml
    python launch/model_info.py model.size=n model.checkpoint=[all] --batch 2

Prints the resolved model config, parameters and GFLOPs at the configured size, then one forward
and backward pass (train mode) on random images, with output shapes and wall time.
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

from adyolo.config import load_model_config, load_run_config
from adyolo.model import build_model
from adyolo.model.summary import summarize
from adyolo.schema import to_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run YAML (with a model: section) or a model YAML")
    parser.add_argument("--batch", type=int, default=1, help="images in the probe step")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.size=n")
    args = parser.parse_args()

    if args.config and not args.overrides:
        cfg = load_model_config(args.config)
    else:
        cfg = load_run_config(args.config, args.overrides).model
    print(yaml.safe_dump({"model": to_dict(cfg)}, sort_keys=False, default_flow_style=None), end="")
    model = build_model(cfg).train()
    print(summarize(model, cfg.img_size))

    images = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size)
    start = time.perf_counter()
    outputs = model(images)
    # Stand-in objective until the detection loss is wired in: it reaches every output.
    sum(o.float().square().mean() for o in outputs).backward()
    elapsed = time.perf_counter() - start
    shapes = ", ".join(str(tuple(o.shape)) for o in outputs)
    print(f"strides {model.strides}; outputs {shapes}")
    print(f"one forward+backward at batch {args.batch}: {elapsed:.2f} s on {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
