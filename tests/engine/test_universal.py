"""ZeRO-1/2/3 checkpoints written by 2 ranks resumed on 1 and on 3 ranks (DeepSpeed's universal checkpoint),
on tiny CPU runs: the step after the resume against the uninterrupted run's, and a conversion that fails."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from deepspeed.checkpoint import ds_to_universal
from mlflow.tracking import MlflowClient

from .runs import ROOT, history, mlflow_run, run, train_command

pytestmark = pytest.mark.distributed

LAUNCH = ROOT / "launch" / "launch.py"
LR = 0.002
# One image per micro-batch: BatchNorm then sees the same statistics however the global batch of 6 is split
# (2 ranks x 3 accumulation, 3 x 2, 1 x 6), so the step after a resume on another number of ranks can be
# compared with the uninterrupted run's. 12 images: 2 steps per epoch on every split; a checkpoint after
# each step, the first in the middle of the epoch.
RUN = [
    "epochs=1",
    "train.global_batch=6",
    "train.micro_batch=1",
    "data.synthetic.num_train=12",
    "train.save_interval=1",
    "train.keep_checkpoints=100",
    "data.augment.mosaic=0",
    "data.augment.fliplr=0",
    "data.augment.scale=0",
    "data.augment.translate=0",
    "optim.optimizer=adamw",
    f"optim.lr={LR}",
    "optim.warmup_epochs=0",
    "optim.warmup_min_steps=0",
    "train.timeout_s=120",
]
FIRST, SECOND = "step-00000001", "step-00000002"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic") / "data"


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[int, Path]:
    """fp32 copies of the shipped ZeRO-1/2/3 accelerate configs: bf16 autocast, emulated on most CPUs, is
    slower there and its rounding would hide what the comparisons look for."""
    folder = tmp_path_factory.mktemp("ds_configs")
    accelerate = {}
    for stage in (1, 2, 3):
        ds = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
        ds["torch_autocast"] = {"enabled": False}
        (folder / f"zero{stage}.json").write_text(json.dumps(ds))
        launch = yaml.safe_load((ROOT / "ds_configs" / f"accelerate_zero{stage}.yaml").read_text())
        launch["deepspeed_config"]["deepspeed_config_file"] = str(folder / f"zero{stage}.json")
        accelerate[stage] = folder / f"accelerate_zero{stage}.yaml"
        accelerate[stage].write_text(yaml.safe_dump(launch))
    return accelerate


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An empty MLflow store with its tables made: a run's own store then skips seconds of schema migration."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def train(configs, synthetic, store):
    """train(stage, out, processes, *extra): a tiny ZeRO run of `RUN` (+ `extra` arguments), finished."""

    def start(stage: int, out: Path, processes: int, *extra: str, wrapper: bool = False):
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "mlflow.db").exists():
            shutil.copy(store, out / "mlflow.db")
        cmd = train_command(out, synthetic, *RUN, launcher=f"zero{stage}", processes=processes) + list(extra)
        cmd[cmd.index("--config_file") + 1] = str(configs[stage])
        if wrapper:  # launch/launch.py exits with the ranks' own code (accelerate launch turns it into 1)
            cmd = [sys.executable, str(LAUNCH), *cmd[2:]]
        return run(cmd)

    return start


@pytest.fixture(scope="module")
def written_by_two(train, tmp_path_factory):
    """stage -> the output folder of an uninterrupted 2-rank run of that ZeRO stage (made once per module)."""
    made: dict[int, Path] = {}

    def make(stage: int) -> Path:
        if stage not in made:
            out = tmp_path_factory.mktemp(f"zero{stage}") / "run"
            proc = train(stage, out, 2)
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[stage] = out
        return made[stage]

    return make


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: (size, modification time), to tell that nothing was written into it."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def consolidated(checkpoint: Path, into: Path) -> dict[tuple[str, str], torch.Tensor]:
    """(parameter, "fp32" | "exp_avg" | "exp_avg_sq") -> the whole tensor, whatever the ranks that wrote the
    checkpoint: DeepSpeed's own consolidation (its universal-checkpoint converter)."""
    args = argparse.Namespace(
        input_folder=str(checkpoint / "pytorch_model"),
        output_folder=str(into / "pytorch_model"),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    states = {}
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        for path in (into / "pytorch_model" / "zero").glob(f"*/{key}.pt"):
            if not path.parent.name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                state = torch.load(path, weights_only=False)
                states[path.parent.name, key] = state["param"] if isinstance(state, dict) else state
    return states


def rank0_states(checkpoint: Path, stage: int) -> tuple[dict, list[dict]]:
    """Rank 0's model state (buffers) and the optimizer's parameter groups (hyperparameters) as saved."""
    shards = checkpoint / "pytorch_model"
    model = "mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    module = torch.load(shards / model, weights_only=False)["module"]
    optimizer = torch.load(shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    optimizer = optimizer["optimizer_state_dict"]
    inner = optimizer["base_optimizer_state"] if stage < 3 else optimizer["optimizer_state_dict"]
    groups = [{k: v for k, v in group.items() if k != "params"} for group in inner["param_groups"]]
    return module, groups


# ZeRO-1 and ZeRO-2 share DeepSpeed's optimizer and checkpoint layout (stage_1_and_2.py): one takes fewer
# ranks, the other more. ZeRO-3 has its own conversion and load, and both.
@pytest.mark.parametrize("stage,targets", [(1, (1,)), (2, (3,)), (3, (1, 3))], ids=["zero1", "zero2", "zero3"])
def test_a_zero_checkpoint_of_two_ranks_resumes_on_other_numbers(stage, targets, written_by_two, train, tmp_path):
    whole = written_by_two(stage)
    first = whole / "checkpoints" / FIRST  # in the middle of the epoch: the resumed runs train its second step
    before = files_of(whole / "checkpoints")
    saved_module, saved_groups = rank0_states(first, stage)
    expected = consolidated(whole / "checkpoints" / SECOND, tmp_path / "expected")
    for ranks in targets:
        out = tmp_path / f"on{ranks}"
        proc = train(stage, out, ranks, "--resume", str(first))
        assert proc.returncode == 0, proc.stderr[-3000:]
        converted = out / "checkpoints" / "universal" / FIRST
        start = f"resumed from {first} (written by 2 ranks; its ZeRO-{stage} optimizer state converted in "
        assert start in proc.stdout
        assert f" s, in {converted}): epoch 1, step 1" in proc.stdout and (converted / "source.json").is_file()
        # Same position in the epoch: the one step left in it, as 6 = 1 x 3 x 2 or 1 x 1 x 6 micro-batches.
        client, mlrun = mlflow_run(out)
        assert sorted(history(client, mlrun, "train/loss_total")) == [2], ranks
        # The step after the resume continued the optimizer state: the Adam moments and fp32 weights after it
        # are the uninterrupted run's (lost moments would differ by their own size, lost weights by far more).
        got = consolidated(out / "checkpoints" / SECOND, tmp_path / f"got{ranks}")
        assert got.keys() == expected.keys()
        for kind, atol in (("exp_avg", 1e-4), ("exp_avg_sq", 1e-4), ("fp32", None)):
            scale = max(t.abs().max().item() for (_, k), t in expected.items() if k == kind)
            for (name, k), want in expected.items():
                if k == kind:  # fp32: Adam moves a weight whose gradient is float noise by up to ~lr
                    tolerance = 3 * LR if atol is None else atol * scale
                    torch.testing.assert_close(got[name, k], want, rtol=0, atol=tolerance, msg=f"{name} {k}")
        # Each group kept its own hyperparameters (weight decay), and the BatchNorm statistics were carried:
        # rank 0 counted its 6 / ranks micro-batches of the step on top of the saved count.
        module, groups = rank0_states(out / "checkpoints" / SECOND, stage)
        assert groups == saved_groups
        for name, count in saved_module.items():
            if name.endswith("num_batches_tracked"):
                assert module[name].item() == count.item() + 6 // ranks, name
    # The original checkpoints were only read.
    assert files_of(whole / "checkpoints") == before


def test_a_conversion_that_fails_says_why_and_leaves_the_checkpoint_as_it_was(written_by_two, train, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(written_by_two(2), out)
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    shard = latest / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])  # a shard cut short
    before = files_of(out / "checkpoints")
    proc = train(2, out, 1, "epochs=2", "--resume", wrapper=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"--resume {latest}: its ZeRO-2 optimizer state of 2 ranks could not be converted for 1 (" in errors[0]
    assert "without conversion on 2 ranks" in errors[0]
    # Nothing half-converted is left, and `latest` and the checkpoint are as they were.
    assert files_of(out / "checkpoints") == before
