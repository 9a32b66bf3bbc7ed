"""The learning-rate schedules, by steps and by time budget."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer

import mmfusion.training.run as run
from mmfusion.config import load_config
from mmfusion.training.module import LRSchedule
from tests.conftest import TINY_RUN


def test_warmup_then_constant():
    f = LRSchedule(warmup=4, total=100, schedule="constant", floor=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(50) == f(99) == f(10_000) == 1.0


def test_cosine_runs_from_one_to_the_floor():
    f = LRSchedule(warmup=0, total=100, schedule="cosine", floor=0.1)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_wsd_is_constant_then_decays_linearly_over_the_last_fraction():
    f = LRSchedule(warmup=10, total=110, schedule="wsd", floor=0.0, decay_fraction=0.2)
    assert all(f(s) == pytest.approx(1.0) for s in range(10, 91))  # progress up to 0.8
    assert f(91) < 0.99
    assert f(95) == pytest.approx(0.75)
    assert f(100) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0)
    g = LRSchedule(warmup=0, total=100, schedule="wsd", floor=0.25, decay_fraction=0.5)
    assert g(75) == pytest.approx(0.25 + 0.75 * 0.5)


def test_time_progress_overrides_step_progress():
    f = LRSchedule(warmup=0, total=1_000_000, schedule="wsd", floor=0.0, decay_fraction=0.5)
    assert f(100) == 1.0
    f.time_progress = 0.75
    assert f(100) == pytest.approx(0.5)
    f.time_progress = 1.3
    assert f(100) == 0.0
    c = LRSchedule(warmup=0, total=1_000_000, schedule="cosine", floor=0.0)
    c.time_progress = 0.5
    assert c(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("bad", [{"schedule": "linear"}, {"schedule": "wsd", "decay_fraction": 0.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        LRSchedule(**{"warmup": 0, "total": 10, "schedule": "constant", "floor": 0.1, **bad})


def test_a_resumed_schedule_follows_the_config_and_keeps_the_time_spent():
    """LambdaLR's state brings back the schedule object's settings; `configure` (called by the module at
    train start) puts the config's back and leaves the time spent alone."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = LRSchedule(warmup=0, total=100, schedule="cosine", floor=0.1)
    old.time_progress = 0.4
    state = torch.optim.lr_scheduler.LambdaLR(opt, old).state_dict()
    new = LRSchedule(warmup=0, total=1000, schedule="wsd", floor=0.0)
    torch.optim.lr_scheduler.LambdaLR(opt, new).load_state_dict(state)
    assert (new.total, new.schedule, new.time_progress) == (100, "cosine", 0.4)  # what LambdaLR restores
    new.configure(0, 1000, "wsd", 0.0)
    assert (new.total, new.schedule, new.floor, new.time_progress) == (1000, "wsd", 0.0, 0.4)


class LRs(L.Callback):
    """The learning rate each optimizer step used."""

    def __init__(self) -> None:
        self.lrs = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # noqa: ANN001
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_a_run_cut_by_its_time_budget_completes_its_decay(tmp_path, monkeypatch, capsys):
    """max_steps far away and a 6 s budget on a clock that advances 0.05 s per step (so the test does
    not depend on the machine's speed): the wsd schedule holds the rate for the first half, then decays
    it to the floor by the step at which the budget runs out."""
    seen = LRs()
    build = run.build_trainer
    monkeypatch.setattr(run, "build_trainer", lambda *a, **k: build(*a, **k, extra_callbacks=[seen]))
    monkeypatch.setattr(Timer, "time_elapsed", lambda self, stage="train": 0.05 * len(seen.lrs))
    lr = 1e-3
    overrides = [
        "train.max_steps=1000000",
        "train.max_time_minutes=0.1",
        "train.lr_schedule=wsd",
        "train.lr_decay_fraction=0.5",
        "train.min_lr_ratio=0.0",
        f"train.lr={lr}",
        "train.ema_decay=0",
        "train.checkpoint_every_n_steps=1000000",
        f"train.out={tmp_path}",
    ]
    run.train(load_config(None, [*TINY_RUN, *overrides]))
    assert 115 <= len(seen.lrs) <= 125, f"the budget of 120 clock steps ended after {len(seen.lrs)}"
    bar = capsys.readouterr().out  # no total and no ETA to show: the budget's time left on the same clock
    assert "budget left=0:01" in bar and "budget left=0:05" in bar and "<00:00" not in bar
    lrs = seen.lrs[2:]  # after the 2 warmup steps
    assert all(x == pytest.approx(lr) for x in lrs[:40]), "no stable phase"
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])), "the rate rose after warmup"
    assert lrs[-1] < 0.05 * lr, f"the run ended at {lrs[-1] / lr:.2f} x the rate: the decay did not finish"
    assert 0.4 * lr < lrs[88] < 0.6 * lr, "not halfway down the decay at 3/4 of the budget"
