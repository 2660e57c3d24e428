"""Engine pieces in one process: batch split, schedule, parameter groups, EMA, checkpoint files."""

from __future__ import annotations

import json
import math
import os
import signal
import types

import psutil
import pytest
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from mlflow.tracking import MlflowClient

from adyolo.engine.autobatch import largest_fitting
from adyolo.engine.batching import BatchSplitError, GlobalBatchSampler, micro_batch_candidates, split_global_batch
from adyolo.engine.checkpoint import (
    LATEST,
    MANIFEST,
    RUN_FILE,
    Resumed,
    _free_name,
    _point_latest,
    _prune,
    choose_resume,
    complete_checkpoints,
    damage,
    resolve_resume,
    roll_back_latest,
    write_manifest,
)
from adyolo.engine.config import LogConfig, OptimConfig, TrainConfig
from adyolo.engine.ema import ModelEMA
from adyolo.engine.memory import FIELDS, fullest_rank_gib, per_rank_metrics, snapshot
from adyolo.engine.optim import BIAS, DECAY, NO_DECAY, Schedule, build_optimizer
from adyolo.engine.phases import PhaseTimes
from adyolo.engine.preflight import check_output_dir, check_resume, clear_previous_run, resumed_batches
from adyolo.engine.trainer import STOP_SIGNALS, Trainer, TrainerParts
from adyolo.failures import InputError
from adyolo.model import ModelConfig, build_model
from adyolo.schema import to_dict
from adyolo.tracking import Tracker, flatten
from adyolo.weights import load_weights, save_weights


def test_global_batch_40_splits():
    assert str(split_global_batch(40, 4)) == "global batch 40 = micro-batch 10 x 4 ranks x 1 accumulation step"
    split = split_global_batch(40, 2, micro_batch=5)
    assert (split.micro_batch, split.accumulation) == (5, 4)
    assert micro_batch_candidates(40, 4) == [10, 5, 4, 3, 2, 1]
    # A micro-batch that does not divide the rank's images: as many accumulation steps as it needs,
    # micro-batches as equal as possible and none larger than asked.
    split = split_global_batch(40, 2, micro_batch=3)
    assert (split.accumulation, split.micro_sizes(0)) == (7, [3, 3, 3, 3, 3, 3, 2])
    with pytest.raises(BatchSplitError, match="train.micro_batch=1 needs 3 micro-batches.*micro_batch >= 2"):
        split_global_batch(40, 16, micro_batch=1)
    with pytest.raises(BatchSplitError, match="cannot be split over 41 ranks.*at most 40 processes"):
        split_global_batch(40, 41)


@pytest.mark.parametrize("world", range(1, 41))
def test_every_rank_count_up_to_the_global_batch_splits_it_exactly(world):
    for micro in (None, 2, 5):
        try:
            split = split_global_batch(40, world, micro)
        except BatchSplitError:
            assert micro is not None and micro < math.ceil(40 / world)  # only a micro-batch too small fails
            continue
        sizes = [split.micro_sizes(r) for r in range(world)]
        assert sum(map(sum, sizes)) == 40 and all(len(s) == split.accumulation for s in sizes)
        assert max(map(max, sizes)) == split.micro_batch and min(map(min, sizes)) >= 1
        assert max(map(max, sizes)) - min(map(min, sizes)) <= 1  # as even as the numbers allow
        assert micro is None or split.micro_batch <= micro


def test_uneven_split_text_and_shares():
    split = split_global_batch(40, 16)
    assert split.shares() == [(8, 3), (8, 2)]
    assert str(split) == "global batch 40 = 8 ranks x 3 + 8 ranks x 2 images (micro-batch 3 / 2, 1 accumulation step)"
    assert str(split_global_batch(40, 3)).startswith("global batch 40 = 1 rank x 14 + 2 ranks x 13 images")


@pytest.mark.parametrize(("world", "micro"), [(1, None), (3, None), (2, 3), (16, None)])
def test_the_sampler_gives_every_image_of_an_epoch_to_one_rank_once(world, micro):
    split = split_global_batch(40, world, micro)
    samplers = [GlobalBatchSampler(123, split, r, seed=5) for r in range(world)]
    for sampler in samplers:
        sampler.set_epoch(2)
    batches = [list(s) for s in samplers]
    assert all(len(b) == len(s) == 3 * split.accumulation for b, s in zip(batches, samplers))  # 3 whole steps
    seen = [i for rank in batches for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 120  # 123 images: 3 steps of 40, the rest dropped
    for step in range(3):  # each step holds its 40 images, each rank its share
        window = slice(step * split.accumulation, (step + 1) * split.accumulation)
        assert [sum(map(len, b[window])) for b in batches] == [split.rank_images(r) for r in range(world)]
    samplers[0].set_epoch(3)
    assert list(samplers[0]) != batches[0]  # reshuffled per epoch
    samplers[0].set_epoch(2)
    samplers[0].skip(2)
    assert list(samplers[0]) == batches[0][2:]  # a resumed epoch goes on where it stopped


def test_one_rank_batches_the_order_accelerate_gave():
    """One rank, no accumulation: the batches of Accelerate's seedable sampler, so a one-process run (the
    embedded default) trains on the images in the same order as before the sampler existed."""
    data = list(range(50))
    torch.manual_seed(7)  # Accelerate seeds its sampler from torch's initial seed
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, drop_last=True)
    prepared = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)).prepare(
        loader
    )
    sampler = GlobalBatchSampler(50, split_global_batch(8, 1), rank=0, seed=7)
    for epoch in (0, 1):
        prepared.set_epoch(epoch)
        sampler.set_epoch(epoch)
        assert [b.tolist() for b in prepared] == list(sampler)


def test_parameter_groups_keep_decay_off_batchnorm_and_biases():
    model = build_model({"size": "n"})
    opt = build_optimizer(model, OptimConfig(weight_decay=5e-4), global_batch=64)
    groups = opt.param_groups
    assert groups[DECAY]["weight_decay"] == pytest.approx(5e-4) and groups[NO_DECAY]["weight_decay"] == 0
    assert groups[BIAS]["weight_decay"] == 0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    bn_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in groups[NO_DECAY]["params"]} == bn_weights
    assert all(p.dim() == 1 for p in groups[BIAS]["params"])
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == pytest.approx(0.937)


def test_schedule_warms_up_then_decays_per_epoch():
    cfg = OptimConfig(lr=0.01, final_lr_ratio=0.01, warmup_epochs=1, warmup_min_steps=0)
    schedule = Schedule(cfg, steps_per_epoch=10, epochs=5)
    lrs, momentum = schedule.values(0)
    assert lrs == [0.0, 0.0, pytest.approx(0.1)] and momentum == pytest.approx(0.8)  # biases start high
    lrs, momentum = schedule.values(5)  # half-way through warm-up
    assert lrs[DECAY] == pytest.approx(0.005) and lrs[BIAS] == pytest.approx(0.055)  # 0.1 + (0.01 - 0.1) / 2
    assert momentum == pytest.approx(0.8685)
    assert schedule.values(10)[0] == [pytest.approx(schedule.epoch_lr(1))] * 3
    assert schedule.values(19)[0][0] == schedule.values(10)[0][0]  # constant within an epoch
    assert schedule.epoch_lr(0) == pytest.approx(0.01) and schedule.epoch_lr(4) == pytest.approx(1e-4)
    assert Schedule(cfg, 10, 100).warmup_steps == 10
    assert Schedule(OptimConfig(warmup_epochs=1, warmup_min_steps=100), 10, 100).warmup_steps == 100


def test_momentum_0_is_plain_sgd():
    """torch refuses Nesterov without momentum; `optim.momentum=0` trains with plain SGD, warm-up included."""
    model = build_model({"size": "n"})
    cfg = OptimConfig(momentum=0.0, warmup_epochs=1, warmup_min_steps=0)
    opt = build_optimizer(model, cfg, 40)
    assert not opt.defaults["nesterov"] and opt.defaults["momentum"] == 0
    schedule = Schedule(cfg, 10, 5)
    assert [schedule.values(step)[1] for step in (0, 5, 10)] == [0.0, 0.0, 0.0]
    schedule.apply(opt, 5)
    before = [p.detach().clone() for p in model.parameters()]
    sum(o.float().mean() for o in model(torch.rand(2, 3, 64, 64))).backward()
    opt.step()
    assert not any(opt.state[p] for p in model.parameters())  # no momentum buffer
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_schedule_writes_into_the_optimizer():
    model = build_model({"size": "n"})
    opt = build_optimizer(model, OptimConfig(warmup_epochs=1, warmup_min_steps=0), 40)
    Schedule(OptimConfig(warmup_epochs=1, warmup_min_steps=0), 10, 5).apply(opt, 5)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.005)] * 2 + [pytest.approx(0.055)]
    assert all(g["momentum"] == pytest.approx(0.8685) for g in opt.param_groups)


def test_ema_averages_parameters_and_buffers():
    torch.manual_seed(0)
    live = build_model({"size": "n"})
    ema = ModelEMA(build_model({"size": "n"}), live, decay=0.5, ramp=1e-9)  # decay 0.5 from the first update
    start = {k: v.clone() for k, v in live.state_dict().items()}
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
        live.backbone.stem.stem_1[1].running_mean.add_(2.0)
    ema.update(live)
    averaged = ema.module.state_dict()
    name = "backbone.stem.stem_1.0.weight"
    torch.testing.assert_close(averaged[name], start[name] + 0.5)
    torch.testing.assert_close(
        averaged["backbone.stem.stem_1.1.running_mean"], start["backbone.stem.stem_1.1.running_mean"] + 1.0
    )
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = ModelEMA(build_model({"size": "n"}), live)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and torch.equal(restored.module.state_dict()[name], averaged[name])


def test_ema_reads_the_live_tensors_at_every_update():
    """The EMA keeps where each tensor lives, not the tensor: one replaced after the first update (as
    `.to(device)` replaces buffers) is the one averaged in the next, and the result is still exactly
    ema * d + live * (1 - d)."""
    torch.manual_seed(0)
    live = build_model({"size": "n"})
    ema = ModelEMA(build_model({"size": "n"}), live, decay=0.5, ramp=1e-9)
    ema.update(live)
    bn = live.backbone.stem.stem_1[1]
    bn.running_var = torch.full_like(bn.running_var, 3.0)  # a new tensor object in the module
    with torch.no_grad():
        live.backbone.stem.stem_1[0].weight.mul_(2.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(live)
    after, now = ema.module.state_dict(), live.state_dict()
    d = ema.current_decay()
    for name in ("backbone.stem.stem_1.1.running_var", "backbone.stem.stem_1.0.weight", "head.convs.0.bias"):
        assert torch.equal(after[name], before[name].mul(d).add(now[name], alpha=1 - d)), name
    assert after["backbone.stem.stem_1.1.num_batches_tracked"] == now["backbone.stem.stem_1.1.num_batches_tracked"]


def test_latest_pointer_and_pruning(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step-{step:08d}").mkdir(parents=True)
        _point_latest(root, f"step-{step:08d}")
        _prune(root, keep=2)
    assert (root / LATEST).read_text().strip() == "step-00000003"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert resolve_resume("latest", tmp_path) == root / "step-00000003"
    # A folder written after the last pointer update (a save that crashed) is not what "latest" means.
    (root / "step-00000004").mkdir()
    assert resolve_resume("latest", tmp_path) == root / "step-00000003"
    with pytest.raises(InputError, match="no checkpoint to resume"):
        resolve_resume("latest", tmp_path / "elsewhere")
    # A second save at the latest step never writes into the folder `latest` points to.
    assert _free_name(root, 3) == "step-00000003-1" and _free_name(root, 5) == "step-00000005"


def checkpoint(root, name: str, manifest: bool = True):
    """A checkpoint folder as a save leaves it: files, `run.json`, the manifest."""
    folder = root / name
    (folder / "pytorch_model").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(3000))
    (folder / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(os.urandom(2000))
    (folder / RUN_FILE).write_text("{}")
    if manifest:
        write_manifest(folder)
    return folder


def test_a_damaged_checkpoint_is_found_before_it_is_loaded(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    older, newer = checkpoint(root, "step-00000004"), checkpoint(root, "step-00000008")
    _point_latest(root, newer.name)
    assert choose_resume("latest", tmp_path) == Resumed(newer) and damage(newer) is None
    # A converted copy written into the folder later is not the manifest's business.
    (newer / "universal").mkdir()
    (newer / "universal" / "mp_rank_00_model_states.pt").write_bytes(b"converted")
    assert damage(newer) is None
    # One flipped bit.
    path = newer / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x10
    path.write_bytes(bytes(data))
    assert damage(newer) == "model.safetensors: its content differs from when it was written (CRC-32)"
    # --resume (latest): the newest intact checkpoint, with a warning and MLflow tags.
    resumed = choose_resume("latest", tmp_path)
    assert resumed.folder == older and resumed.damaged == newer
    assert resumed.tags == {"resume.damaged": f"step-00000008 ({damage(newer)})", "resume.fallback": "step-00000004"}
    assert "(checkpoints/latest) is damaged: model.safetensors" in capsys.readouterr().err
    assert choose_resume("latest", tmp_path, main_process=False).folder == older and not capsys.readouterr().err
    # --resume <folder>: exit 2, the file and the intact alternatives.
    with pytest.raises(InputError, match=rf"damaged: model.safetensors: .*intact: {older} \(--resume <one of them>"):
        choose_resume(str(newer), tmp_path)
    # A truncated shard of another rank; a lost file; an unreadable manifest.
    shard = older / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1500])
    assert damage(older) == "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt: 1500 bytes, 2000 when written"
    with pytest.raises(InputError, match=r"step-00000008 \(checkpoints/latest\) is damaged.*no other checkpoint"):
        choose_resume("latest", tmp_path)
    with pytest.raises(InputError, match="no other checkpoint in .* is intact"):
        choose_resume(str(older), tmp_path)
    shard.unlink()
    assert damage(older) == "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"
    (older / MANIFEST).write_text('{"files": ')
    assert damage(older) == "manifest.json: unreadable (JSONDecodeError)"
    # `latest` naming a folder that is gone falls back like a damaged one.
    fresh = checkpoint(root, "step-00000009")
    _point_latest(root, "step-00000010")
    assert choose_resume("latest", tmp_path).folder == fresh
    # Once the run holds the folder, a damaged `latest` is set aside: pruning cannot keep it in place of an
    # intact checkpoint, and the next --resume finds `latest` intact.
    _point_latest(root, newer.name)
    resumed = choose_resume("latest", tmp_path)
    resumed.set_aside()
    assert (root / "damaged-step-00000008").is_dir() and not newer.exists()
    assert (root / LATEST).read_text().strip() == "step-00000009" and choose_resume("latest", tmp_path).damaged is None


def test_pruning_keeps_complete_checkpoints_and_drops_saves_cut_short(tmp_path):
    """A rank killed during a save leaves a folder without a manifest; the next save at that step gets
    another name. Pruning must keep the complete ones, so that a damaged `latest` has one to fall back to."""
    root = tmp_path / "checkpoints"
    legacy = checkpoint(root, "step-00000002", manifest=False)  # from before manifests: complete
    checkpoint(root, "step-00000006")
    checkpoint(root, "step-00000008")
    cut_short = checkpoint(root, "step-00000010", manifest=False)
    assert complete_checkpoints(root) == [root / "step-00000008", root / "step-00000006", legacy]
    checkpoint(root, _free_name(root, 10))
    _point_latest(root, "step-00000010-1")
    _prune(root, keep=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000008", "step-00000010-1"]
    assert not cut_short.exists() and roll_back_latest(tmp_path, 10) == root / "step-00000008"


def test_a_checkpoint_from_before_manifests_still_resumes(tmp_path):
    root = tmp_path / "checkpoints"
    legacy = checkpoint(root, "step-00000004", manifest=False)
    _point_latest(root, legacy.name)
    assert damage(legacy) is None and choose_resume("latest", tmp_path) == Resumed(legacy)
    assert choose_resume(str(legacy), tmp_path).folder == legacy
    # It is not an intact alternative, though: without a manifest a folder may be a save cut short.
    damaged = checkpoint(root, "step-00000008")
    (damaged / "model.safetensors").write_bytes(b"")
    _point_latest(root, damaged.name)
    with pytest.raises(InputError, match="no other checkpoint"):
        choose_resume("latest", tmp_path)


def test_a_run_folder_is_not_overwritten_and_a_resume_must_fit(tmp_path):
    check_output_dir(tmp_path, None, False)  # empty: fine
    (tmp_path / "checkpoints").mkdir()
    _point_latest(tmp_path / "checkpoints", "step-00000008")
    with pytest.raises(InputError, match=r"already holds a run \(checkpoints/latest -> step-00000008\).*--resume"):
        check_output_dir(tmp_path, None, False)
    check_output_dir(tmp_path, "latest", False)
    check_output_dir(tmp_path, None, True)
    (tmp_path / "best.pt").write_bytes(b"x")
    clear_previous_run(tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "best.pt").exists()

    folder = tmp_path / "step"
    folder.mkdir()
    config = {"model": {"size": "n", "fusion": "efficient"}, "train": {"global_batch": 8}}
    saved = {"config": config, "world_size": 2, "micro_batch": 4, "zero_stage": 2}
    (folder / RUN_FILE).write_text(json.dumps(saved))
    assert check_resume(folder, config, 2, 2) == saved
    other = {**config, "model": {"size": "s", "fusion": "efficient"}}
    with pytest.raises(InputError, match="another model \\(model.size: 'n' -> 's'\\)"):
        check_resume(folder, other, 2, 2)
    # A checkpoint written before `model.neck` existed is a GD model: it resumes as one.
    full = {**config, "model": to_dict(ModelConfig(size="n", fusion="efficient"))}
    assert full["model"]["neck"] == "gd" and check_resume(folder, full, 2, 2) == saved
    with pytest.raises(InputError, match="model.neck: 'gd' -> 'yolov5face'"):
        check_resume(folder, {**config, "model": {**config["model"], "neck": "yolov5face"}}, 2, 2)
    # On another number of ranks a ZeRO checkpoint is converted (engine/universal.py): its shards must all be there.
    with pytest.raises(InputError, match="needs 2 optimizer shards .*found 0 optimizer shard"):
        check_resume(folder, config, 1, 2)
    (folder / "pytorch_model").mkdir()
    for name in ("mp_rank_00_model_states.pt", *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))):
        (folder / "pytorch_model" / name).write_bytes(b"")
    assert check_resume(folder, config, 1, 2) == saved and check_resume(folder, config, 3, 2) == saved
    with pytest.raises(InputError, match="cannot be resumed without DeepSpeed"):
        check_resume(folder, config, 1, 0)
    # Without ZeRO the state is whole: any number of ranks, at the same position in the epoch.
    (folder / RUN_FILE).write_text(json.dumps({**saved, "zero_stage": 0}))
    assert check_resume(folder, config, 1, 0)["world_size"] == 2
    # 3 micro-batches of 4 on each of 2 ranks = 3 steps of 8: on one rank at micro-batch 2, 3 x 4.
    assert resumed_batches({**saved, "zero_stage": 0}, 3, split_global_batch(8, 1, 2)) == 12
    assert resumed_batches({**saved, "accumulation": 3}, 6, split_global_batch(8, 3)) == 2


def test_portable_weights_round_trip(tmp_path):
    model = build_model({"size": "n", "fusion": "efficient"})
    save_weights(tmp_path / "best.pt", model.state_dict(), {"model": {"size": "n", "fusion": "efficient"}}, epoch=3)
    loaded, config = load_weights(tmp_path / "best.pt")
    assert config["model"]["fusion"] == "efficient" and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place

    # A file from before BatchNorm took eps 1e-3 holds no eps: it loads with the 1e-5 it was trained
    # with, and gives what a model built with that eps gives.
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    assert payload.pop("batch_norm_eps") == 1e-3
    torch.save(payload, tmp_path / "old.pt")
    old, _ = load_weights(tmp_path / "old.pt")
    norms = [m for m in old.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-5
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(old(x), model.eval()(x)))
        assert not all(torch.equal(a, b) for a, b in zip(loaded(x), old(x)))


def test_memory_metrics_one_section_per_kind_with_every_rank():
    nan = float("nan")
    gathered = torch.tensor([[1.0, 2.0, 0.5, 1.5, 2.5], [3.0, 4.0, 1.0, 2.0, nan]], dtype=torch.float64)
    gpu = per_rank_metrics(gathered, "cuda")
    assert gpu["memory/peak_allocated_gib/rank0"] == 1.0 and gpu["memory/peak_reserved_gib/rank1"] == 4.0
    assert gpu["memory/peak_allocated_gib/max"] == 3.0 and gpu["memory/peak_allocated_gib/spread"] == 2.0
    # NVML's count where it could read it, and max/spread over the ranks that have one.
    assert gpu["memory/nvml_process_gib/rank0"] == 2.5 and "memory/nvml_process_gib/rank1" not in gpu
    assert gpu["memory/nvml_process_gib/spread"] == 0.0
    # On CPU allocated and reserved are both the RSS: logged once each, as what they are.
    cpu = per_rank_metrics(gathered, "cpu")
    assert sorted(cpu) == sorted(
        f"memory/{kind}/{who}" for kind in ("peak_rss_gib", "rss_gib") for who in ("rank0", "rank1", "max", "spread")
    )
    assert cpu["memory/rss_gib/rank1"] == 1.0 and cpu["memory/peak_rss_gib/max"] == 3.0
    assert fullest_rank_gib(gathered, "cpu") == 3.0 and fullest_rank_gib(gathered[:1], "cuda") == 1.0
    # One rank: max and spread would only repeat rank 0.
    assert sorted(per_rank_metrics(gathered[:1], "cpu")) == ["memory/peak_rss_gib/rank0", "memory/rss_gib/rank0"]


def test_cpu_snapshot_reads_the_process_rss():
    values = dict(zip(FIELDS, snapshot(torch.device("cpu")).tolist()))
    rss = psutil.Process().memory_info().rss / 2**30
    assert values["allocated_gib"] == pytest.approx(rss, rel=0.1) and values["peak_allocated_gib"] >= rss * 0.9
    assert math.isnan(values["nvml_process_gib"])


def test_flatten_config():
    assert flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}}) == {"a": 1, "b.c": [1, 2], "b.d.e": None}


def test_tracker_logs_to_its_store_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    """A later subprocess (another run started from this process) must not log into this store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(True, uri, "parts", tmp_path, "one")
    tracker.log_metrics({"loss": 1.5}, step=3)
    tracker.finish()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("parts").experiment_id])
    assert run.data.metrics == {"loss": 1.5} and run.info.run_name == "one"


def test_auto_micro_batch_takes_the_largest_that_fits():
    tried = []

    def fits(micro):
        tried.append(micro)
        if micro > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 23.93 GiB")

    assert largest_fitting(micro_batch_candidates(40, 2), fits) == 4  # then accumulation 5 keeps 40
    assert tried == [20, 10, 7, 5, 4]
    with pytest.raises(RuntimeError, match="not even a micro-batch of 1 fits"):
        largest_fitting([2, 1], lambda m: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))


def test_the_trainer_handles_stop_signals_only_while_it_fits(tmp_path):
    """Building a Trainer leaves the process alone; fit() installs its SIGTERM/SIGUSR1 handlers and
    puts the previous ones back, also when training fails."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    ended = []
    accelerator = types.SimpleNamespace(end_training=lambda: ended.append(True))
    parts = TrainerParts(accelerator, None, None, None, state=None, tracker=None, report=None, phases=PhaseTimes())
    trainer = Trainer(parts, TrainConfig(), LogConfig(), epochs=1, output_dir=tmp_path, record={}, precision="fp32")
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
    during = {}

    def fit_once():
        during.update({sig: signal.getsignal(sig) for sig in STOP_SIGNALS})
        return 0

    trainer._fit = fit_once
    assert trainer.fit() == 0 and ended == [True]
    assert all(handler == trainer._on_signal for handler in during.values())
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before

    def crash():
        raise RuntimeError("boom")

    trainer._fit = crash
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
