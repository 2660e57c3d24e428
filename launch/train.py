"""Train ADYOLOv5-Face: one process, or many through `accelerate launch` (DDP or DeepSpeed ZeRO).

    python launch/train.py                                  # the embedded synthetic default
    accelerate launch --config_file ds_configs/accelerate_zero2.yaml launch/train.py \\
        --config launch/configs/widerface_s.yaml epochs=250
    accelerate launch ... launch/train.py --config run.yaml --resume        # continue from latest
    sbatch slurm/train.sh run.yaml                                          # many nodes (Slurm)

A bad config key, type or value, bad data, a `--resume` that cannot work or an output folder that
already holds a run stop every rank with one line (the file, line or key, and the fix) before any
data is trained on or any process group is used. Exit codes (the same through `launch/launch.py`,
DeepSpeed's launcher and slurm/train.sh): 0 done, 2 bad input, 3 too many non-finite losses (`latest`
holds the last finite state), 74 a checkpoint could not be written (disk full; `latest` intact),
75 stopped by SIGTERM/SIGUSR1 or Ctrl-C (checkpoint saved; rerun with --resume), 130 Ctrl-C twice
(stopped at once). One run writes an output folder at a time (`run.lock`; --force-unlock takes over
the lock of a run that is gone).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from adyolo.config import load_run_config
from adyolo.engine.batching import BatchSplitError
from adyolo.failures import EXIT_BAD_INPUT, EXIT_INTERRUPTED, RunFailure, record_exit, stop_with_parent
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
    parser.add_argument(
        "--exist-ok",
        action="store_true",
        help="start over in an output_dir that already holds a run (its checkpoints, weights and results are removed)",
    )
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over an output_dir whose lock names a run that is not running any more (its node was lost)",
    )
    # DeepSpeed's launcher passes each rank its local rank as an argument too (also in $LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 model.size=n")
    try:
        args = parser.parse_intermixed_args()  # key=value overrides before or after --resume
    except SystemExit as stop:  # a usage error (2): the launcher wrapper reads the code too
        record_exit(stop.code)
        raise
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value`: an override after a bare --resume, not a checkpoint folder.
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    return args


def main() -> int:
    args = parse_args()
    stop_with_parent()  # under a launcher: if it dies, save and stop rather than train on orphaned
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = load_run_config(args.config, args.overrides)
        code = build_run(cfg, args.resume, args.exist_ok, args.force_unlock).fit()
    except (ConfigError, BatchSplitError, RunFailure) as err:
        # Every rank meets the same input error; one line, from the main rank, says it.
        if main_rank:
            print(f"error: {err}", file=sys.stderr)
        code = getattr(err, "exit_code", EXIT_BAD_INPUT)
    except KeyboardInterrupt:  # Ctrl-C twice during training, or once before it began: nothing saved now
        if main_rank:
            print("interrupted (Ctrl-C): stopped without saving; --resume continues from checkpoints/latest")
        code = EXIT_INTERRUPTED
    record_exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
