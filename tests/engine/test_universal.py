"""ZeRO-1/2/3 checkpoints written by 2 ranks resumed on 1 or 3 ranks (DeepSpeed's universal checkpoint), with
AdamW and SGD, on tiny CPU runs: the step after the resume against the uninterrupted run's; a conversion that
fails."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from adyolo.engine.checkpoint import write_manifest
from adyolo.engine.universal import convert_to_universal

from .runs import ROOT, history, mlflow_run, run, train_command

pytestmark = pytest.mark.distributed

LAUNCH = ROOT / "launch" / "launch.py"
LR = {"adamw": 0.002, "sgd": 0.01}
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
    "optim.warmup_epochs=0",
    "optim.warmup_min_steps=0",
    "train.timeout_s=120",
]
FIRST, SECOND = "step-00000001", "step-00000002"


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
    """train(stage, optimizer, out, processes, *extra): a tiny ZeRO run of `RUN` (+ `extra` arguments), finished."""

    def start(stage: int, optimizer: str, out: Path, processes: int, *extra: str, wrapper: bool = False):
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "mlflow.db").exists():
            shutil.copy(store, out / "mlflow.db")
        optim = [f"optim.optimizer={optimizer}", f"optim.lr={LR[optimizer]}"]
        cmd = train_command(out, synthetic, *RUN, *optim, launcher=f"zero{stage}", processes=processes) + list(extra)
        cmd[cmd.index("--config_file") + 1] = str(configs[stage])
        if wrapper:  # launch/launch.py exits with the ranks' own code (accelerate launch turns it into 1)
            cmd = [sys.executable, str(LAUNCH), *cmd[2:]]
        return run(cmd)

    return start


@pytest.fixture(scope="module")
def written_by_two(train, tmp_path_factory):
    """(stage, optimizer) -> the output folder of an uninterrupted 2-rank run (made once per module)."""
    made: dict[tuple[int, str], Path] = {}

    def make(stage: int, optimizer: str) -> Path:
        if (stage, optimizer) not in made:
            out = tmp_path_factory.mktemp(f"zero{stage}-{optimizer}") / "run"
            proc = train(stage, optimizer, out, 2)
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[stage, optimizer] = out
        return made[stage, optimizer]

    return make


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: (size, modification time), to tell that nothing was written into it."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def consolidated(checkpoint: Path, into: Path, stage: int, optimizer: str) -> dict[tuple[str, str], torch.Tensor]:
    """(parameter, "fp32" | "exp_avg" | "exp_avg_sq") -> the whole tensor, whatever the ranks that wrote the
    checkpoint: DeepSpeed's own consolidation, its universal-checkpoint converter (SGD's momentum as exp_avg)."""
    convert_to_universal(checkpoint / "pytorch_model", into / "pytorch_model", stage, optimizer == "sgd")
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
# ranks, the other more. ZeRO-3 has its own conversion and load: more ranks with AdamW, fewer with SGD, whose
# momentum DeepSpeed's converter does not read as it is.
@pytest.mark.parametrize(
    "stage,optimizer,ranks",
    [(1, "sgd", 1), (2, "adamw", 3), (3, "adamw", 3), (3, "sgd", 1)],
    ids=["zero1-sgd-on1", "zero2-adamw-on3", "zero3-adamw-on3", "zero3-sgd-on1"],
)
def test_a_zero_checkpoint_of_two_ranks_resumes_on_another_number(
    stage, optimizer, ranks, written_by_two, train, tmp_path
):
    whole = written_by_two(stage, optimizer)
    first = whole / "checkpoints" / FIRST  # in the middle of the epoch: the resumed run trains its second step
    before = files_of(whole / "checkpoints")
    out = tmp_path / "resumed"
    proc = train(stage, optimizer, out, ranks, "--resume", str(first))
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = out / "checkpoints" / "universal" / FIRST
    start = f"resumed from {first} (written by 2 ranks; its ZeRO-{stage} optimizer state converted in "
    assert start in proc.stdout
    assert f" s, in {converted}): epoch 1, step 1" in proc.stdout and (converted / "source.json").is_file()
    # Same position in the epoch: the one step left in it, as 6 = 1 x 3 x 2 or 1 x 1 x 6 micro-batches.
    client, mlrun = mlflow_run(out)
    assert sorted(history(client, mlrun, "train/loss_total")) == [2]
    # The step after the resume continued the optimizer state: the momenta (Adam's two moments, SGD's momentum)
    # and fp32 weights after it are the uninterrupted run's; lost momenta would differ by their own size.
    expected = consolidated(whole / "checkpoints" / SECOND, tmp_path / "expected", stage, optimizer)
    got = consolidated(out / "checkpoints" / SECOND, tmp_path / "got", stage, optimizer)
    assert got.keys() == expected.keys()
    for kind in ("exp_avg", "exp_avg_sq", "fp32"):
        scale = max(t.abs().max().item() for (_, k), t in expected.items() if k == kind)
        assert scale > 0 or (kind, optimizer) == ("exp_avg_sq", "sgd"), kind  # SGD has no second moment
        # Adam moves a weight whose gradient is only float noise (a bias before BatchNorm) by up to ~lr.
        tolerance = 3 * LR[optimizer] if (kind, optimizer) == ("fp32", "adamw") else 1e-4 * scale
        for (name, k), want in expected.items():
            if k == kind:
                torch.testing.assert_close(got[name, k], want, rtol=0, atol=tolerance, msg=f"{name} {k}")
    # Each group kept its own hyperparameters (weight decay), and the BatchNorm statistics were carried:
    # rank 0 counted its 6 / ranks micro-batches of the step on top of the saved count.
    saved_module, saved_groups = rank0_states(first, stage)
    module, groups = rank0_states(out / "checkpoints" / SECOND, stage)
    assert groups == saved_groups
    for name, count in saved_module.items():
        if name.endswith("num_batches_tracked"):
            assert module[name].item() == count.item() + 6 // ranks, name
    # The original checkpoints were only read.
    assert files_of(whole / "checkpoints") == before


def test_a_conversion_that_fails_says_why_and_leaves_the_checkpoint_as_it_was(written_by_two, train, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(written_by_two(2, "adamw"), out)
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    shard = latest / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    # A shard written short and recorded so in its manifest (a damage after writing is found by the
    # manifest and resumed around; see test_faults): only the conversion can find it.
    shard.write_bytes(shard.read_bytes()[:1000])
    write_manifest(latest)
    before = files_of(out / "checkpoints")
    proc = train(2, "adamw", out, 1, "epochs=2", "--resume", wrapper=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"--resume {latest}: its ZeRO-2 optimizer state of 2 ranks could not be converted for 1 (" in errors[0]
    assert "without conversion on 2 ranks" in errors[0]
    # Nothing half-converted is left, and `latest` and the checkpoint are as they were.
    assert files_of(out / "checkpoints") == before
