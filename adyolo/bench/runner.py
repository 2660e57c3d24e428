"""One benchmark row in fresh processes: one per GPU through `accelerate launch` (with the ds_configs/
files of the row's ZeRO stage), each running `adyolo.bench.worker`. An out-of-memory error, a crash or
a hang becomes the row's result instead of ending the benchmark."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from adyolo.engine.accelerator import DS_CONFIGS
from adyolo.engine.batching import split_global_batch

WORKER = "adyolo.bench.worker"
EXIT_OOM = 17  # a rank ran out of memory; recorded in its rank file (see worker)


def launch_command(row: dict, common: dict, row_dir: Path) -> list[str]:
    """One process per GPU through `accelerate launch`; a single DDP process needs no launcher."""
    worker = [WORKER, json.dumps({**row, **common}), str(row_dir)]
    if row["zero"] == "0" and common["gpus"] == 1:
        return [sys.executable, "-m", *worker]
    if row["zero"] == "0":
        launcher = ["--config_file", str(DS_CONFIGS / "accelerate_ddp.yaml")]
    else:
        # The stage's JSON with this row's precision: under DeepSpeed, precision lives in the JSON.
        # The batch fields too: without a data loader to read them from, accelerate needs them stated.
        split = split_global_batch(row["global_batch"], common["gpus"], common["micro_batch"])
        ds = json.loads((DS_CONFIGS / f"zero{row['zero']}.json").read_text())
        ds["torch_autocast"] = {"enabled": row["precision"] == "bf16", "dtype": "bfloat16"}
        zero = ds["zero_optimization"]
        if row.get("bucket", "json") != "json":
            zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = int(float(row["bucket"]))
        if row.get("overlap_comm", "json") != "json":
            zero["overlap_comm"] = row["overlap_comm"] == "on"
        ds.update(
            train_micro_batch_size_per_gpu=split.micro_batch,
            gradient_accumulation_steps=split.accumulation,
            # DeepSpeed checks micro x accumulation x ranks; an uneven split's smaller shares train less.
            train_batch_size=split.micro_batch * split.accumulation * split.world_size,
        )
        (row_dir / "deepspeed.json").write_text(json.dumps(ds, indent=2))
        launcher = [
            "--config_file",
            str(DS_CONFIGS / f"accelerate_zero{row['zero']}.yaml"),
            "--deepspeed_config_file",
            str(row_dir / "deepspeed.json"),
        ]
    accelerate = Path(sys.executable).with_name("accelerate")
    ports = ["--main_process_port", "0"]
    return [str(accelerate), "launch", *launcher, "--num_processes", str(common["gpus"]), *ports, "-m", *worker]


def run_row(row: dict, common: dict, row_dir: Path, timeout_s: float) -> dict:
    """Measure one row in fresh processes; OOM, a crash or a hang become the row's result."""
    row_dir.mkdir(parents=True, exist_ok=True)
    command = launch_command(row, common, row_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(row_dir / "log.txt", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
            proc.wait()
            returncode = None
    return {**row, **collect(row_dir, returncode)}


def collect(row_dir: Path, returncode: int | None) -> dict:
    """What a row's processes left behind: the result, the first rank's OOM, or why there is neither;
    with the plan's prediction for the row when the main process made it before the steps."""
    plan = row_dir / "plan.json"
    predicted = json.loads(plan.read_text()) if plan.is_file() else {}
    ooms = sorted(row_dir.glob("oom-rank*.json"))
    if ooms:
        return {**predicted, **json.loads(ooms[0].read_text())}
    result = row_dir / "result.json"
    if returncode == 0 and result.is_file():
        return {**predicted, **json.loads(result.read_text())}
    if returncode is None:
        return {"error": "timed out"}
    lines = (row_dir / "log.txt").read_text(errors="replace").strip().splitlines()
    # The first exception message, not the launcher's ChildFailedError that follows it.
    errors = [line for line in lines if re.search(r"\w+(Error|Exception): ", line) and "ChildFailedError" not in line]
    errors = errors or [line for line in lines if "terminate called" in line or "Signal" in line]
    return {"error": f"exit {returncode}: {(errors or lines[-1:] or ['no output'])[0].strip()[:200]}"}
