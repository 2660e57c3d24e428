"""What this machine offers a training run, as one report to read or paste into an issue.

    python launch/doctor.py                      # this process's view
    srun --nodes=2 --ntasks-per-node=1 python launch/doctor.py        # every node of an allocation

Prints the launch as this process sees it (ranks, node, the DeepSpeed JSON, whether the scheduler gives
the node GPUs) and the device decision a run would make (or why it would stop at start: a GPU node whose
GPUs torch cannot use, fewer GPUs than ranks, a GPU the torch build has no kernels for), each GPU with
its compute capability, free memory and native bf16, then torch's own environment report
(`torch.utils.collect_env`: versions of torch, CUDA, cuDNN, the driver, ...) and DeepSpeed's op report.
Exits 0 when a run could start here, 2 when it would be refused.
"""

from __future__ import annotations

import argparse
import sys

from adyolo.engine.devices import LaunchEnvironment, check_device, environment_report
from adyolo.failures import EXIT_BAD_INPUT, InputError


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    env = LaunchEnvironment.read()
    print(environment_report(env))
    try:
        check_device(env)
    except InputError:
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
