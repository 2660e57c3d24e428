"""The plan's decisions: the least recompute, then the fewest accumulation steps, that fit; the global
batch exact; `auto` settings of a run resolved from it; the data-parallel terms per ZeRO stage."""

from __future__ import annotations

import pytest

from adyolo.config import load_run_config
from adyolo.engine.accelerator import DeepSpeedSettings, LaunchSettings
from adyolo.engine.batching import BatchSplitError
from adyolo.plan import auto
from adyolo.plan.cost import Line, StepMemory
from adyolo.plan.planner import CHECKPOINT_LADDER, Planner, Setting, checkpoint_name, ladder_blocks
from adyolo.plan.terms import GIB, ZeroSettings, data_parallel_bytes
from adyolo.schema import ConfigError

# Made-up step memory per checkpointing (GiB): fixed + per image; recompute saves activation memory.
PER_IMAGE = {"off": 1.0, "selected": 0.5, "all": 0.25}


def planner_with(per_image: dict[str, float]) -> Planner:
    cfg = load_run_config(None, [])
    planner = Planner(cfg.model, cfg.loss, cfg.optim, cfg.train, "bf16")
    for name, slope in per_image.items():
        line = Line(0.5 * GIB, slope * GIB)
        for policy in ("cpu", "cuda"):  # the same made-up step whichever autocast policy traced it
            planner._memory[(CHECKPOINT_LADDER[name], policy)] = StepMemory(line, line, 10**7, 10**7, ())
    return planner


def test_least_recompute_first_then_fewest_accumulation_steps():
    planner = planner_with(PER_IMAGE)
    zero = ZeroSettings(stage=0)
    # 40 images on 1 GPU: without checkpointing 10 images fit 16 GiB (0.5 + 10 + context), 20 do not.
    chosen = planner.recommend(40, 1, zero, 16).setting
    assert (chosen.micro_batch, chosen.accumulation, chosen.checkpoint) == (10, 4, "off")
    # Where not even one image without recompute fits, the selected blocks come next.
    assert planner.recommend(40, 1, zero, 2.0).setting.checkpoint == "selected"
    # More ranks: fewer images each, no accumulation; the global batch stays exact.
    chosen = planner.recommend(40, 4, zero, 16).setting
    assert (chosen.micro_batch, chosen.accumulation) == (10, 1)
    assert planner.recommend(40, 1, zero, 1.0) is None  # nothing fits
    # Ranks that do not divide the batch: planned by the larger share (14 of 40 on 3 ranks, as 7 x 2).
    chosen = planner.recommend(40, 3, zero, 16).setting
    assert (chosen.micro_batch, chosen.accumulation) == (7, 2)
    with pytest.raises(BatchSplitError):
        planner.recommend(40, 41, zero, 16)


def test_the_device_total_adds_what_pytorch_does_not_see():
    planner = planner_with(PER_IMAGE)
    p = planner.predict(Setting(4, 1, "off"), 2, ZeroSettings(stage=0))
    assert p.terms["step_tensors"] == pytest.approx(4.5 * GIB)
    assert p.terms["ddp_buckets"] == 10**7  # one more copy of the gradients
    # cuDNN / cuBLAS workspaces come from the caching allocator: inside allocated (and reserved).
    assert p.terms["cuda_workspaces"] == planner.gpu.workspace_gib * GIB > 0
    inside = sum(v for k, v in p.terms.items() if not k.startswith("outside_pytorch."))
    assert p.allocated == pytest.approx(inside) and "outside_pytorch.workspaces" not in p.terms
    assert p.reserved == pytest.approx(p.allocated * planner.gpu.reserve)
    outside = sum(v for k, v in p.terms.items() if k.startswith("outside_pytorch."))
    assert set(p.terms) >= {"outside_pytorch.cuda_context", "outside_pytorch.nccl"}  # NCCL: 2 ranks
    assert p.device_total == pytest.approx(p.reserved + outside) and outside > 0.5 * GIB
    cpu = planner.predict(Setting(4, 1, "off"), 2, ZeroSettings(stage=0), device="cpu")
    assert cpu.device_total == cpu.allocated < p.allocated  # no GPU kernel, allocator or context terms


def test_zero_shards_the_optimizer_state_and_adds_its_buckets():
    params, state = 40 * 2**20, 80 * 2**20
    zero2 = data_parallel_bytes(ZeroSettings(2, reduce_bucket_size=5 * 10**7), 4, params, state)
    assert zero2["optimizer_state_sharded"] == -state * 3 / 4 and zero2["fp32_share"] == params / 4
    assert zero2["reduce_buckets"] == 2 * 5 * 10**7 * 4
    offload = data_parallel_bytes(ZeroSettings(2, offload_optimizer=True), 4, params, state)
    assert offload["optimizer_state_offloaded"] == -state and "fp32_share" not in offload
    assert data_parallel_bytes(ZeroSettings(0), 1, params, state) == {}  # one process: nothing to add


def test_auto_settings_of_a_run_come_from_the_plan(monkeypatch):
    """On a CPU, with the process's memory fixed at 1 GiB: a budget that holds the full batch without
    recompute keeps it; a tighter one makes the plan pick accumulation or checkpointing; an impossible
    one stops the run with the figures."""
    monkeypatch.setattr(auto, "process_memory", lambda: (GIB, GIB))
    overrides = ["model.size=n", "model.img_size=96", "train.global_batch=8", "train.micro_batch=auto"]
    launch = LaunchSettings(world_size=2, local_world_size=2, deepspeed=None, precision="fp32")
    cfg = load_run_config(None, [*overrides, "model.checkpoint=auto", "train.memory_budget_gib=64"])
    resolved, plan = auto.plan_run(cfg, launch, main_process=True)
    assert (resolved.train.micro_batch, resolved.model.checkpoint) == (4, [])
    assert plan.auto == ("train.micro_batch", "model.checkpoint") and plan.params()["plan.auto"]

    full = plan.predicted_budget_use / GIB
    cfg = load_run_config(None, [*overrides, f"train.memory_budget_gib={full - 0.001}"])
    resolved, plan = auto.plan_run(cfg, launch, main_process=False)
    assert resolved.train.micro_batch < 4 and plan.predicted_budget_use / GIB <= full - 0.001

    cfg = load_run_config(None, [*overrides, "train.memory_budget_gib=1.0"])
    with pytest.raises(ConfigError, match=r"train.micro_batch: auto: nothing fits 1.0 GiB per rank"):
        auto.plan_run(cfg, launch, main_process=True)


def test_a_run_without_auto_plans_only_on_the_main_process_for_its_log():
    launch = LaunchSettings(2, 2, DeepSpeedSettings(2, False, 10.0), "fp32")
    cfg = load_run_config(None, ["model.size=n", "model.img_size=96", "train.global_batch=8"])
    assert auto.plan_run(cfg, launch, main_process=False) == (cfg, None)
    same, plan = auto.plan_run(cfg, launch, main_process=True)
    assert same is cfg and plan.prediction.setting == Setting(4, 1, "off") and plan.prediction.zero == "zero2"
    assert plan.summary().startswith("memory plan: micro 4 x accum 1, ckpt off; predicted peak RSS per rank ")


def test_the_ladder_takes_the_blocks_of_the_model_neck():
    gd, yolo = load_run_config().model, load_run_config(None, ["model.neck=yolov5face"]).model
    gd_selected = ("backbone.stem", "backbone.stage1", "neck.low_fusion", "neck.inject_p2")
    assert ladder_blocks("selected", gd) == Setting(1, 1, "selected").blocks_for(gd) == gd_selected
    assert ladder_blocks("selected", yolo) == ("backbone.stem", "backbone.stage1", "neck.top_down_p3")
    assert ladder_blocks("all", yolo) == ("all",) and ladder_blocks("off", yolo) == ()
    for model in (gd, yolo):
        assert checkpoint_name(ladder_blocks("selected", model), model) == "selected"
    assert checkpoint_name(gd_selected) == "selected"  # without a model: either neck's step
    assert checkpoint_name(["backbone.stem"], yolo) == "backbone.stem"
    # The baseline has no self-attention: no attention-kernel term.
    cfg = load_run_config(None, ["model.neck=yolov5face"])
    assert Planner(cfg.model, cfg.loss, cfg.optim, cfg.train).attention_q_elements(8) == 0
