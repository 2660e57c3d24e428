"""`accelerate launch`, with the training job's own exit code: the same arguments, e.g.

    python launch/launch.py --config_file ds_configs/accelerate_zero2.yaml launch/train.py --config run.yaml

`accelerate launch` (torchrun) reports any failed rank as exit code 1 after a long traceback of its
own. This wrapper runs it, passes its output through, and exits with the code the ranks agreed on
(2 bad input, 3 non-finite, 74 write failed, 75 stopped by signal, 130 Ctrl-C twice: see
launch/train.py), leaving out the launcher's traceback for those expected endings. SIGTERM, SIGUSR1
and SIGINT reach the ranks as SIGTERM (they save and stop with 75), and if this wrapper is killed
outright the launcher gets SIGTERM from the kernel, so no rank trains on unsupervised.
"""

from __future__ import annotations

import sys

from adyolo.failures import EXIT_BAD_INPUT
from adyolo.launcher import supervise


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_BAD_INPUT
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
