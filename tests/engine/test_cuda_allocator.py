"""The allocator setting training makes (`adyolo.engine.cuda_allocator`) and the plan's reserve that
follows it. On a GPU, `tests/gpu/test_training.py` checks a run's segments and MLflow parameters."""

from __future__ import annotations

import pytest

from adyolo.engine import cuda_allocator
from adyolo.engine.cuda_allocator import DEFAULT, ENV, NEWER_ENV, allocator_setting, configure_cuda_allocator
from adyolo.plan.terms import GpuAssumptions


def test_expandable_segments_unless_the_user_chose(capsys):
    environ: dict[str, str] = {}
    setting = configure_cuda_allocator(environ, announce=True)
    assert environ == {ENV: "expandable_segments:True"} == {ENV: DEFAULT}
    assert (setting.conf, setting.source, setting.expandable_segments) == (DEFAULT, "adyolo", True)
    assert "set by adyolo" in setting.summary()
    if not setting.cuda:  # nothing to say, nothing to log where there is no GPU
        assert capsys.readouterr().out == "" and setting.params() == {}

    mine = {ENV: "max_split_size_mb:128"}
    setting = configure_cuda_allocator(mine)
    assert mine == {ENV: "max_split_size_mb:128"}  # kept as it was
    assert (setting.source, setting.expandable_segments) == (ENV, False)
    assert setting.summary() == f"CUDA allocator: {ENV}='max_split_size_mb:128' (yours, kept)"

    # The newer name is read first by torch, so it is the one in effect.
    both = {ENV: "expandable_segments:True", NEWER_ENV: "expandable_segments:False,garbage_collection_threshold:0.6"}
    assert configure_cuda_allocator(both).source == NEWER_ENV and not allocator_setting(both).expandable_segments
    assert ENV in both and both[ENV] == "expandable_segments:True"


def test_a_cuda_process_logs_its_setting(monkeypatch, capsys):
    monkeypatch.setattr(cuda_allocator.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_allocator.torch.cuda, "is_initialized", lambda: False)
    setting = configure_cuda_allocator({}, announce=True)
    assert capsys.readouterr().out.startswith(f"CUDA allocator: {ENV}=expandable_segments:True (set by adyolo")
    assert setting.params() == {"cuda_alloc_conf": DEFAULT, "cuda_alloc_conf_source": "adyolo"}
    assert configure_cuda_allocator({ENV: ""}).params() == {"cuda_alloc_conf": "default", "cuda_alloc_conf_source": ENV}


def test_an_allocator_already_started_takes_the_setting_directly(monkeypatch):
    applied = []
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(NEWER_ENV, raising=False)
    monkeypatch.setattr(cuda_allocator.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda_allocator, "_apply_now", applied.append)
    configure_cuda_allocator()
    assert applied == [DEFAULT]


@pytest.mark.parametrize(
    "environ,reserve", [({}, 1.05), ({ENV: "expandable_segments:False"}, 1.10), ({ENV: "max_split_size_mb:64"}, 1.10)]
)
def test_the_plans_reserve_follows_the_setting_training_will_use(monkeypatch, environ, reserve):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(NEWER_ENV, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert GpuAssumptions().reserve == reserve
