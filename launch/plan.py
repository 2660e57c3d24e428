"""Will it fit? Per-rank memory of training, predicted without a GPU, and the setting to use.

    python launch/plan.py                                         # the embedded default config
    python launch/plan.py --config launch/configs/widerface_s.yaml  # size s, 640 px, global batch 40
    python launch/plan.py --config run.yaml --gpus 2 --gpu-memory-gib 24 --zero 3 --variants full/sdpa
    python launch/plan.py --config run.yaml --json                # the same, machine-readable

For the run config's model, image size and global batch, and each variant (full/sdpa, full/explicit,
efficient; with model.neck=yolov5face the baseline alone): the predicted per-rank memory per micro-batch
and activation checkpointing (off, selected blocks, all), and for each number of GPUs and GPU size the
recommended setting: the least recompute, then the fewest accumulation steps, that fits, with the global
batch exact. The prediction traces one real training step on fake tensors (nothing is allocated; for
a GPU in bf16 with CUDA autocast's dtypes) and adds what a trace cannot see (ZeRO's sharding and buffers
from ds_configs/, the GPU's attention kernel, cuDNN/cuBLAS workspaces, the allocator's reserve, which
follows PYTORCH_CUDA_ALLOC_CONF as training will set it, CUDA context, NCCL); see adyolo/plan/terms.py
and docs/memory-plan.md. Traces are cached (~/.cache/adyolo/plan), so a repeated plan takes seconds.
Writes plan.md, plan.json and plan.png to --out (default runs/plan/<config name>).

    python launch/plan.py --validate  # minutes: predicted vs real CPU steps (1-4 processes, every live
                                      # tensor's bytes per rank) and CUDA autocast's dtypes on fake tensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adyolo.config import load_run_config
from adyolo.plan.main import GPU_SIZES_GIB, VARIANTS, PlanRequest, make_plan
from adyolo.plan.validate import table, validate_cpu
from adyolo.schema import ConfigError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run YAML (default: the embedded default)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.img_size=320")
    parser.add_argument(
        "--gpus", default="1,2,3,4,6,8,12,16,32", help="numbers of GPUs (comma list; any count splits the global batch)"
    )
    sizes = ",".join(f"{s:g}" for s in GPU_SIZES_GIB)
    parser.add_argument("--gpu-memory-gib", default=sizes, help="GPU sizes in GiB (comma list)")
    parser.add_argument("--zero", default="2", choices=["0", "1", "2", "2_offload", "3"], help="ZeRO stage (0: DDP)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument(
        "--device",
        default="gpu",
        choices=["gpu", "cpu"],
        help="cpu: plan CPU processes (their private memory against --gpu-memory-gib, as RLIMIT_DATA counts it)",
    )
    parser.add_argument("--out", type=Path, help="folder for plan.md, plan.json, plan.png")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    parser.add_argument(
        "--validate",
        action="store_true",
        help="instead: check the plan against real CPU training steps, 1 to 4 processes (minutes)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.validate:
        out = args.out or Path("runs") / "plan" / "validation"
        out.mkdir(parents=True, exist_ok=True)
        text = table(validate_cpu(out / "cache"))
        (out / "validation.md").write_text(text)
        print(text + f"written to {out}/validation.md")
        return 0
    try:
        cfg = load_run_config(args.config, args.overrides)
        variants = [v for v in args.variants.split(",") if v]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        request = PlanRequest(
            gpus=[int(g) for g in args.gpus.split(",")],
            gpu_memory_gib=[float(s) for s in args.gpu_memory_gib.split(",")],
            zero=args.zero,
            variants=variants,
            precision=args.precision,
            device=args.device,
            out=args.out or Path("runs") / "plan" / Path(args.config).stem,
        )
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan = make_plan(cfg, request)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else plan.markdown() + f"\nwritten to {request.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
