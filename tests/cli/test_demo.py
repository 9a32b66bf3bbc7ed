"""The demo's training layout: how many processes and threads `mmfusion demo` asks Lightning for, and
that the layout leaves the recipe (the global batch) alone."""

from __future__ import annotations

import os

import pytest

from mmfusion.cli.demo import demo
from mmfusion.errors import UserError


class _Stop(Exception):
    pass


def _train_config(monkeypatch, tmp_path, **kwargs):  # noqa: ANN001, ANN202
    seen = {}

    def fake_train(cfg, resume=False):  # noqa: ANN001, ANN202
        seen["cfg"], seen["resume"] = cfg, resume
        raise _Stop

    monkeypatch.setattr("mmfusion.training.demo.train", fake_train)
    with pytest.raises(_Stop):
        demo(out=str(tmp_path / "demo"), **kwargs)
    assert seen["resume"] is kwargs.get("resume", False)
    return seen["cfg"]


def test_demo_trains_data_parallel_on_two_or_more_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    cfg = _train_config(monkeypatch, tmp_path)
    t = cfg.train
    assert (t.devices, t.strategy, t.accelerator, t.threads) == (2, "ddp", "cpu", 2)
    assert cfg.data.process_batch(t.devices) == 64  # 128 samples per step, 64 in each process
    assert _train_config(monkeypatch, tmp_path, threads=1).train.threads == 1


def test_demo_one_process_takes_every_core(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    cfg = _train_config(monkeypatch, tmp_path, processes=1)
    t = cfg.train
    assert (t.devices, t.strategy, t.threads) == (1, "auto", 4)
    assert cfg.data.process_batch(t.devices) == 128  # the same 128 samples per step, all in one process
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    t = _train_config(monkeypatch, tmp_path).train
    assert (t.devices, t.strategy, t.threads) == (1, "auto", 1)


def test_demo_rejects_zero_processes(tmp_path):
    with pytest.raises(UserError, match="--processes"):
        demo(out=str(tmp_path / "demo"), processes=0)


def test_demo_resume_goes_on_with_the_same_run(monkeypatch, tmp_path):
    """`--resume` reaches the training (the rest of the time budget from last.ckpt, then the evaluation);
    without a checkpoint it is the one-line error of `mmfusion train --resume`."""
    cfg = _train_config(monkeypatch, tmp_path, resume=True, processes=1)
    assert cfg.train.out == str(tmp_path / "demo")
    monkeypatch.undo()
    with pytest.raises(UserError, match="no checkpoint"):
        demo(out=str(tmp_path / "none"), resume=True, processes=1)


def test_demo_resume_refuses_other_settings(monkeypatch, tmp_path):
    """A resumed demo is the stopped one: another --seed or --minutes is refused, naming the settings;
    another process layout is not."""
    import json

    out = tmp_path / "demo"

    def first_run(cfg, resume=False):  # noqa: ANN001, ANN202
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict()))  # what train records
        raise _Stop

    monkeypatch.setattr("mmfusion.training.demo.train", first_run)
    with pytest.raises(_Stop):
        demo(out=str(out), seed=3, minutes=2.0, processes=1)
    with pytest.raises(UserError, match=r"data.shapes_seed 3 -> 4; train.seed 3 -> 4"):
        demo(out=str(out), seed=4, minutes=2.0, processes=1, resume=True)
    with pytest.raises(UserError, match=r"max_time_minutes 2.0 -> 12"):
        demo(out=str(out), seed=3, processes=1, resume=True)
    with pytest.raises(_Stop):  # two processes instead of one: the same run
        demo(out=str(out), seed=3, minutes=2.0, processes=2, resume=True)
