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
import sys
from pathlib import Path

from adyolo.config import load_run_config
from adyolo.engine.batching import BatchSplitError
from adyolo.run import build_run
from adyolo.schema import ConfigError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


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
        trainer = build_run(load_run_config(args.config, args.overrides), args.resume)
    except (ConfigError, BatchSplitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return trainer.fit()


if __name__ == "__main__":
    sys.exit(main())
