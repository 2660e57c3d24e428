"""The YOLOv5-Face baseline and the GD variants trained and measured side by side, on one config.

    python launch/compare.py                                   # the hard synthetic preset, 2 seeds, + transfer
    python launch/compare.py --seeds 0,1,2 --out runs/compare3
    python launch/compare.py --networks efficient,full epochs=20   # key=value overrides reach every run

Each network x seed trains in `<out>/<network>-seed<seed>/` (a `launch/train.py` process each, one at a
time); with --transfer NETWORK that GD network trains once more from the baseline's first-seed best.pt
(`train.init_weights`). Finished runs are kept and an interrupted one is resumed, so rerunning the
command continues the set. At the end every run's best.pt is evaluated on the validation split (AP easy
/ medium / hard, on the smallest faces and per attribute), the cost measured (parameters, GFLOPs,
training and eval images/s, peak memory), and `compare.md` + `compare.json` written to --out.
Exit code 2: a bad argument or config, before anything trains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adyolo.compare import NETWORKS, run_comparison
from adyolo.config import load_run_config
from adyolo.schema import ConfigError


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="launch/configs/synthetic_hard.yaml", help="the run config every run uses")
    parser.add_argument("--networks", default=",".join(NETWORKS), help=f"comma list of: {', '.join(NETWORKS)}")
    parser.add_argument("--seeds", default="0,1", help="comma list of train.seed values")
    parser.add_argument("--transfer", default="efficient", help="GD network trained from the baseline ('' for none)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder of the runs and the report")
    parser.add_argument("--train-only", action="store_true", help="train what is missing; no report")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    networks = [n for n in args.networks.split(",") if n]
    unknown = [n for n in networks + ([args.transfer] if args.transfer else []) if n not in NETWORKS]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
        if unknown or not networks or not seeds:
            raise ValueError(f"--networks/--transfer take {', '.join(NETWORKS)} and --seeds integers")
        if args.transfer == "yolov5face":
            raise ValueError("--transfer names a GD network (efficient or full): the baseline is what it starts from")
        for network in networks:  # every run's config, checked before the first one trains
            load_run_config(args.config, [*args.overrides, *NETWORKS[network]])
    except (ValueError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_comparison(args.config, args.out, networks, seeds, args.transfer or None, args.overrides, args.train_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
