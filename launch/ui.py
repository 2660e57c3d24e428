"""Open a training run's MLflow store in the MLflow UI.

    python launch/ui.py                      # runs/default
    python launch/ui.py runs/slurm/adyolo-1234 --port 5001

Points the store at the artifacts beside it first (a run folder that was copied or moved keeps its
pictures and weights), prints the URL of the newest run in the UI's model-training view, then runs
`mlflow ui` on the folder's `mlflow.db` until stopped (Ctrl-C). Exit code 2: no store in that folder.
"""

from __future__ import annotations

import argparse
import os
import sys

from adyolo.mlflow_ui import UIError, newest_run, prepare, run_url


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/default", help="a run's output_dir (default runs/default)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to reach it from other machines")
    parser.add_argument("--port", type=int, default=5000)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    try:
        command, note = prepare(args.run_dir)
    except UIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if note:
        print(note)
    base = f"http://{args.host}:{args.port}"
    run = newest_run(args.run_dir)
    if run is not None:
        print(f"run {run.info.run_name}: {run_url(base, run)}")
    print(f"all runs: {base}", flush=True)  # execv drops what is still buffered
    command += ["--host", args.host, "--port", str(args.port)]
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
