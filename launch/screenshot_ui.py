"""Screenshot a training run's charts in the MLflow UI, in a real (headless) browser.

    python launch/screenshot_ui.py runs/default --out mlflow_memory.png          # per-rank memory peaks
    python launch/screenshot_ui.py runs/zero2 --search val/ --out val.png

Serves the run folder's store (as `launch/ui.py` does), opens the newest run's "Model metrics" tab in
the model-training view, types `--search` into the chart search, waits until the charts are drawn (a
bare `chromium --screenshot` catches them still loading) and saves the page.

Needs what the training environment does not: Debian's `chromium` and `chromium-driver`
(`apt-get install chromium chromium-driver`) and `pip install selenium`. Exit code 2 when they or the
run's store are missing.
"""

from __future__ import annotations

import argparse
import sys

from adyolo.mlflow_ui import UIError, screenshot


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training run's output_dir")
    parser.add_argument("--out", default="mlflow_memory.png", help="PNG to write")
    parser.add_argument("--search", default="memory/peak", help="chart search text (default: the memory peaks)")
    parser.add_argument("--size", type=int, nargs=2, default=(1500, 900), metavar=("W", "H"), help="window pixels")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the server and the charts")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    try:
        url = screenshot(args.run_dir, args.out, args.search, tuple(args.size), args.timeout)
    except UIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
