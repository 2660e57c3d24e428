"""A fault soak: a 2-rank tiny CPU run trained through N random faults, resumed after each, and its per-step
losses compared with those of the same run trained without a fault.

    python -m tests.engine.soak --faults 12 --seed 0                 # from the repository root
    python -m tests.engine.soak --faults 4 --launcher zero2 --keep /tmp/soak

Each fault strikes at a random moment of training (after 1 to 3 optimizer steps of the run, the
first run's first two checkpoints written):

- `kill -9 rank`: one rank killed outright; the job ends (exit 1) and resumes from `latest`;
- `SIGTERM launcher`: `launch/launch.py` passes it on, the ranks save at the step and exit 75;
- `disk full`: the run folder's filesystem (a small tmpfs, so root only; left out otherwise) filled up:
  the next checkpoint fails (exit 74, `latest` intact), the space is freed, the run resumes;
- `damaged latest`: the run is stopped (SIGTERM) and one byte of a file of its `latest` checkpoint is
  flipped: `--resume` finds it against the manifest and resumes from the checkpoint before.

The runs log every step (`train.log_interval=1`) into one MLflow run, so every loss a step was trained
with is in its history, a step trained again after a fault included. The resume is exact when each of
them equals the uninterrupted run's loss at that step (relative 1e-5). Printed: the wall time, each
fault with the exit code and what `--resume` started from, and the steps done again.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

from tests.engine.runs import LEARNABLE, environment, train_command, wrapped

KINDS = ("kill -9 rank", "SIGTERM launcher", "disk full", "damaged latest")
STEPS_PER_EPOCH = 4  # tests/configs/tiny.yaml: 16 images, global batch 4
EXPECTED_CODE = {"SIGTERM launcher": 75, "disk full": 74, "damaged latest": 75}  # a killed rank: any failure
DISK_MIB = 400
TOLERANCE = 1e-5
# Rank 0's progress, a bar on a terminal or a plain line in a file ("epoch 3/7:  50% 2/4 [" is step 10).
PROGRESS = re.compile(r"epoch (\d+)/\d+: +\d+%(?:\|[^|\r\n]*\|)? *(\d+)/\d+ \[")
RESUMED = re.compile(r"resumed from (\S+): epoch \d+, step (\d+)")


@dataclass
class Fault:
    kind: str
    after_steps: int  # optimizer steps of this run before the fault
    code: int | None = None
    reached: int = 0  # the last step the run showed before it ended
    resumed_from: str = ""  # the checkpoint the next run started from (by its own words)
    resumed_step: int = 0


@dataclass
class Soak:
    faults: list[Fault] = field(default_factory=list)
    steps: int = 0
    redone: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0
    disk: Path | None = None  # the small filesystem the run folder lived on (None: no full-disk faults)

    @property
    def ok(self) -> bool:
        codes = all(f.code == EXPECTED_CODE.get(f.kind, f.code) and f.code not in (0, None) for f in self.faults)
        return codes and not self.mismatches and self.steps > 0

    def report(self) -> str:
        lines = [f"{'fault':<42} {'at step':>7}  {'exit':>4}  resumed from"]
        lines += [f"{f.kind:<42} {f.reached:>7}  {f.code!s:>4}  {f.resumed_from}" for f in self.faults]
        lines.append(
            f"{len(self.faults)} faults survived, {self.steps} steps, {self.redone} steps done again, per-step "
            f"losses {'equal to' if not self.mismatches else 'DIFFERENT from'} the uninterrupted run's; "
            f"{self.seconds / 60:.1f} min"
        )
        lines += self.mismatches[:10]
        return "\n".join(lines)


class Job:
    """A started training job whose stderr is read on a thread (a full pipe would stall it)."""

    def __init__(self, command: list[str]):
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment(),
            start_new_session=True,
        )
        self.text = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.text += chunk.decode(errors="replace")

    def step(self) -> int | None:
        """The last optimizer step rank 0's progress bar showed (`epoch 3/7: ... | 2/4 [` is step 10), or
        None before it showed one."""
        shown = PROGRESS.findall(self.text)
        return None if not shown else (int(shown[-1][0]) - 1) * STEPS_PER_EPOCH + int(shown[-1][1])

    def wait_until(self, done, timeout: float = 900) -> bool:
        """Whether `done()` came true while the job ran (and within `timeout`)."""
        deadline = time.time() + timeout
        while not done():
            if self.proc.poll() is not None or time.time() > deadline:
                return False
            time.sleep(0.1)
        return True

    def end(self, timeout: float = 3600) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code

    def stop(self) -> None:
        """Kill whatever of the job still runs (its session: the launcher and the ranks)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def ranks(self) -> list[psutil.Process]:
        children = psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in children if "train.py" in " ".join(p.cmdline()) and "launch" not in p.cmdline()]


def command(out: Path, synthetic: Path, epochs: int, launcher: str) -> list[str]:
    overrides = [
        f"epochs={epochs}",
        "train.save_interval=2",
        "train.eval_interval=1000",  # the last epoch only: the soak is about training steps
        "log.system_metrics=false",
        "log.progress_interval_s=0.001",  # a progress line per step: where the faults are placed
        *LEARNABLE,
    ]
    return wrapped(train_command(out, synthetic, *overrides, launcher=launcher))


def losses(out: Path) -> list[tuple[int, float]]:
    """Every (step, loss) the run folder's MLflow run logged, a step logged twice included."""
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss_total")]


def latest_name(out: Path) -> str:
    pointer = out / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else ""


def mount_small_disk(folder: Path) -> bool:
    """A tmpfs of `DISK_MIB` at `folder` (root only); whether it is there."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    try:
        with open(filler, "wb") as file:
            while True:
                file.write(b"\0" * 2**20)
                file.flush()
    except OSError:  # full: also where the run's own files left no room to create the filler at all
        pass
    return filler


def damage_latest(out: Path, rng: random.Random) -> str:
    """Flip one byte of a random file of the checkpoint `latest` points to; returns which."""
    folder = out / "checkpoints" / latest_name(out)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json" and p.stat().st_size)
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    data[rng.randrange(len(data))] ^= 0xFF
    target.write_bytes(bytes(data))
    return str(target.relative_to(folder))


def inject(kind: str, job: Job, out: Path, disk: Path, rng: random.Random) -> Path | None:
    """Strike `kind` at `job` (training); returns the filler file of a full disk, to be removed after."""
    if kind == "kill -9 rank":
        rng.choice(job.ranks()).kill()
    elif kind in ("SIGTERM launcher", "damaged latest"):
        job.proc.send_signal(signal.SIGTERM)
    elif kind == "disk full":
        return fill(disk)
    return None


def soak(faults: int, seed: int, root: Path, launcher: str = "ddp") -> Soak:
    """Train through `faults` random faults in `root` (a tmpfs is mounted at `root/disk` when possible)."""
    rng = random.Random(seed)
    started = time.monotonic()
    synthetic = root / "synthetic"
    disk = root / "disk"
    mounted = mount_small_disk(disk)
    kinds = [k for k in KINDS if mounted or k != "disk full"]
    result = Soak(disk=disk if mounted else None)
    job = None
    # Every kind once first (in a random order), then any; enough steps for each run to train a few.
    plan = rng.sample(kinds, len(kinds))[:faults] + [rng.choice(kinds) for _ in range(faults - len(kinds))]
    # A run trains at most 3 steps, one more in flight, and 2 to the checkpoint that a full disk stops.
    epochs = math.ceil(6 * faults / STEPS_PER_EPOCH) + 1
    try:
        reference = root / "uninterrupted"
        job = Job(command(reference, synthetic, epochs, launcher))
        if job.end() != 0:
            raise RuntimeError(f"the uninterrupted run failed:\n{job.text[-3000:]}")
        out = disk / "run"
        resume: list[str] = []
        for kind in plan:
            job = Job(command(out, synthetic, epochs, launcher) + resume)
            if resume:
                _resumed(job, result.faults[-1])
            # The first run trains 4 steps: two checkpoints to go back to.
            start = result.faults[-1].resumed_step if resume else 0
            fault = Fault(kind, rng.randint(1, 3) if resume else 4)
            if not job.wait_until(lambda: (job.step() or 0) >= start + fault.after_steps):  # noqa: B023
                raise RuntimeError(f"the run ended before a fault ({job.proc.poll()}):\n{job.text[-3000:]}")
            time.sleep(rng.uniform(0.0, 0.5))  # somewhere in the next step
            filler = inject(kind, job, out, disk, rng)
            fault.code = job.end()
            fault.reached = job.step() or 0
            if filler is not None:
                filler.unlink(missing_ok=True)
            if kind == "damaged latest":
                fault.kind += f" ({damage_latest(out, rng)})"
            result.faults.append(fault)
            resume = ["--resume"]
        job = Job(command(out, synthetic, epochs, launcher) + resume)
        _resumed(job, result.faults[-1])
        if job.end() != 0:
            raise RuntimeError(f"the last resume failed ({job.proc.returncode}):\n{job.text[-3000:]}")
        expected = dict(losses(reference))
        logged = losses(out)
        result.steps = len(expected)
        result.redone = sum(max(f.reached - f.resumed_step, 0) for f in result.faults)
        missing = sorted(set(expected) - {step for step, _ in logged})
        if missing:
            result.mismatches.append(f"steps never logged: {missing}")
        for step, value in logged:
            if abs(value - expected[step]) > TOLERANCE * abs(expected[step]):
                result.mismatches.append(f"step {step}: loss {value} after a fault, {expected[step]} without")
    finally:
        if job is not None:
            job.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)
        result.seconds = time.monotonic() - started
    return result


def _resumed(job: Job, fault: Fault) -> None:
    """Record on `fault` what the run after it resumed from (by its own words), once it has said so."""
    if not job.wait_until(lambda: RESUMED.search(job.text)):
        raise RuntimeError(f"the run after {fault.kind} did not resume ({job.proc.poll()}):\n{job.text[-3000:]}")
    folder, step = RESUMED.search(job.text).groups()
    fallback = " (latest was damaged)" if "the newest intact checkpoint" in job.text else ""
    fault.resumed_from, fault.resumed_step = Path(folder).name + fallback, int(step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launcher", choices=("ddp", "zero1", "zero2", "zero3"), default="ddp")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = soak(args.faults, args.seed, args.keep, args.launcher)
    else:
        with tempfile.TemporaryDirectory(prefix="adyolo-soak-") as root:
            result = soak(args.faults, args.seed, Path(root), args.launcher)
    print(result.report())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
