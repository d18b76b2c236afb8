"""trainer.time_budget_min: the plan's arithmetic, a budgeted run that stores its plan and resumes exactly, the
calibration leaving the run unchanged, re-planning from the run's own epochs, and the guard that stops a run whose
machine slowed down badly."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import pytest
import torch
from conftest import compose_train
from fakedata import write_cifar10_python
from test_train import FAST, _stop_at

from cvt_train.engine import trainer as trainer_module
from cvt_train.engine.budget import (
    END_MARGIN,
    GUARD_STOP,
    HOLD_TAIL,
    MARGIN,
    REPLAN_GROW,
    REPLAN_SLACK,
    Plan,
    plan_epochs,
    replan,
)
from cvt_train.engine.trainer import Trainer, train


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=500, n_test=200)  # 10 steps of 50


def overrides(cifar, *extra):
    return [*FAST, "data=cifar10", f"data.root={cifar}", "trainer.precision=fp32", *extra]


KEEP_PLAN = "trainer.time_budget_replan=false"  # the first plan only: the run then does not depend on the clock


def fixed_clock(monkeypatch, train_rate: float | dict, eval_rate: float = 1000.0, spent: float = 0.0) -> list:
    """Calibration and start-up time as given (the planning is then deterministic): train_rate for every input size,
    or {size: rate}; returns the calls (forwards per evaluated batch, and the sizes timed)."""
    calls = []

    def calibrate(trainer, forwards, sizes):
        calls.append(forwards if sizes == [32] else (forwards, sizes))
        return {s: train_rate[s] if isinstance(train_rate, dict) else train_rate for s in sizes}, eval_rate

    monkeypatch.setattr(trainer_module, "calibrate", calibrate)
    monkeypatch.setattr(trainer_module, "process_age_s", lambda: spent)
    return calls


def test_plan_arithmetic():
    # 10 min, 60 s spent; epochs of 6,000 images at 100 img/s (60 s) and evaluations of 1,000 at 1,000 img/s (1 s)
    plan = plan_epochs(10, 60.0, 100.0, 1000.0, 6000, 1000, eval_every=1)
    left = 600 * (1 - MARGIN) - 60
    assert plan.epochs == int(left // 61) == 8 and plan.total_s <= 600 * (1 - MARGIN)
    assert plan_epochs(10, 60.0, 100.0, 1000.0, 6000, 1000, eval_every=3).seconds(8) == 8 * 60 + 3 * 1  # 3, 6, 8
    assert plan_epochs(1, 500.0, 100.0, 1000.0, 6000, 1000, eval_every=1).epochs == 1  # never fewer than one


def test_budgeted_run_stores_its_plan_and_resumes_exactly(cifar, tmp_path, monkeypatch, caplog):
    # 1 min: 58.2 s left; 500 images at 30 img/s = 16.7 s per epoch, 0.2 s per evaluation -> 3 epochs
    args = overrides(cifar, "trainer.time_budget_min=1", "trainer.epochs=50", KEEP_PLAN)
    with monkeypatch.context() as m:
        calls = fixed_clock(m, 30.0)
        with caplog.at_level(logging.INFO, logger="cvt_train"):
            train(compose_train(args), tmp_path / "full")
    assert calls == [1] and "3 epochs planned" in caplog.text
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert full["plan"]["epochs"] == 3 and full["epoch"] == 3  # trainer.epochs=50 did not count
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["epoch"] == 3

    with monkeypatch.context() as m:
        fixed_clock(m, 30.0)
        _stop_at(m, 15)  # mid-epoch 2
        train(compose_train(args), tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["plan"]["epochs"] == 3
    with monkeypatch.context() as m:
        calls = fixed_clock(m, 1e9)  # a resumed run must not plan again (this rate would plan far more epochs)
        train(compose_train([*args, "trainer.resume=auto"]), tmp_path / "cut")
    assert calls == []
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 3 and all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])


@pytest.mark.parametrize("resize", [[], ["trainer.resize.min_size=16"]])
def test_calibration_leaves_the_run_unchanged(cifar, tmp_path, caplog, resize):
    """A real calibration (the model copy's steps, the loader's first batches, at every input size of
    trainer.resize): the run then equals an unbudgeted run of the planned number of epochs, bit for bit."""
    with caplog.at_level(logging.INFO, logger="cvt_train"):
        train(
            compose_train(overrides(cifar, "trainer.time_budget_min=0.5", "trainer.eval_tta=flip", KEEP_PLAN, *resize)),
            tmp_path / "b",
        )
    planned = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    epochs = planned["plan"]["epochs"]
    assert f"{epochs} epochs planned" in caplog.text and planned["plan"]["train_images_per_s"] > 0
    assert len(planned["plan"]["epoch_times"]) == (epochs if resize else 0)
    train(compose_train(overrides(cifar, f"trainer.epochs={epochs}", "trainer.eval_tta=flip", *resize)), tmp_path / "e")
    plain = torch.load(tmp_path / "e" / "last.pt", weights_only=True)
    assert all(torch.equal(planned["model"][k], plain["model"][k]) for k in plain["model"])
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert "tta_top1" in metrics and "tta_top1" in json.loads((tmp_path / "e" / "metrics.json").read_text())


@pytest.mark.parametrize("replan,budget", [("false", 0.05), ("true", 0.0005)])
def test_guard_stops_a_run_that_falls_far_behind_its_plan(cifar, tmp_path, monkeypatch, caplog, replan, budget):
    # calibrated at a rate no CPU reaches: the first epoch takes far longer than planned (re-planning: so long that
    # even one more epoch ends past the budget)
    with monkeypatch.context() as m:
        fixed_clock(m, 1e6, 1e7)
        with caplog.at_level(logging.INFO, logger="cvt_train"):
            args = overrides(cifar, f"trainer.time_budget_min={budget}", f"trainer.time_budget_replan={replan}")
            trainer = Trainer(compose_train(args), tmp_path)
            assert trainer.epochs > 10
            trainer.fit()
    assert "stopping after epoch 1 of the planned" in caplog.text
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


def test_resuming_an_unbudgeted_run_with_a_budget_is_refused(cifar, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _stop_at(m, 5)
        train(compose_train(overrides(cifar, "trainer.epochs=2")), tmp_path)
    with pytest.raises(trainer_module.UserError, match="made without a time budget"):
        Trainer(compose_train(overrides(cifar, "trainer.time_budget_min=1", "trainer.resume=auto")), tmp_path)


def test_epochs_shorter_than_the_calibration_warmup(cifar, tmp_path):
    """2 steps per epoch (fewer than the calibration's warm-up): timed whole, and the plan is made."""
    trainer = Trainer(compose_train(overrides(cifar, "trainer.time_budget_min=0.2", "data.train_subset=100")), tmp_path)
    assert trainer.steps_per_epoch == 2 and trainer.epochs >= 1 and trainer.plan.train_images_per_s > 0


def test_replan_arithmetic():
    # calibrated: 10 s per full-size epoch, 5 s at 16 px, 1 s per evaluation (every epoch); 10 minutes, 0 s spent
    plan = Plan(10, 40, 600.0, 1000.0, 0.0, 10.0, 1.0, size_costs={16: 0.5, 32: 1.0})
    full = lambda n: [32] * n  # noqa: E731

    # two epochs of 20 s, one evaluation of 2 s (epoch 2's is still to come): an n-epoch plan has n - 2 epochs of
    # 20 s and n - 1 evaluations of 2 s to go, padded by REPLAN_SLACK
    def remaining(n, overhead=1.0, slack=REPLAN_SLACK):
        return ((n - 2) * 20 + (n - 1) * 2) * overhead * (1 + slack)

    left = 600 * (1 - END_MARGIN) - 44
    epochs, pace, end = replan(plan, 2, 44.0, {32: [20.0, 20.0]}, [2.0], 1.0, full)
    assert (
        pace == 2.0
        and remaining(epochs) <= left < remaining(epochs + 1)
        and end == pytest.approx(44 + remaining(epochs, slack=0.0))
    )
    # a plan that still fits is kept unless REPLAN_GROW more epochs fit (padded) ...
    times = (2, 44.0, {32: [20.0, 20.0]}, [2.0], 1.0, full)
    assert replan(replace(plan, epochs=epochs - 1), *times)[0] == epochs - 1
    assert replan(replace(plan, epochs=epochs - REPLAN_GROW), *times)[0] == epochs
    # ... and shrinks only when it does not fit even unpadded, to the most that fit padded
    unpadded = max(n for n in range(3, 100) if remaining(n, slack=0.0) <= left)
    assert unpadded > epochs  # (REPLAN_SLACK is worth more than an epoch here)
    assert replan(replace(plan, epochs=unpadded), *times)[0] == unpadded
    assert replan(replace(plan, epochs=unpadded + 1), *times)[0] == epochs
    # ... and never grows once HOLD_TAIL of it has run (room for ~30 more epochs of 10 s here), but still shrinks
    tail = (18, 200.0, {32: [10.0] * 18}, [1.0], 1.0, full)
    held = round(18 / HOLD_TAIL)  # a plan of which the 18 epochs run are HOLD_TAIL
    assert replan(replace(plan, epochs=held), *tail)[0] == held
    assert replan(replace(plan, epochs=held + 1), *tail)[0] > held + REPLAN_GROW
    assert replan(replace(plan, epochs=held), 18, 570.0, *tail[2:])[0] == 19
    # a size not yet run is predicted from the calibration times the pace of the sizes that did run (2x here) ...
    half = lambda n: [16] * 2 + [32] * (n - 2)  # noqa: E731
    assert replan(plan, 2, 44.0, {16: [10.0, 10.0]}, [2.0], 1.0, half)[0] == epochs
    # ... but not faster than calibrated: 16-px epochs at half their calibrated 5 s leave 32 px at its 10 s
    calibrated = max(
        n for n in range(3, 100) if ((n - 2) * 10 + (n - 1) * 2) * (1 + REPLAN_SLACK) <= 600 * (1 - END_MARGIN) - 5
    )
    assert replan(replace(plan, epochs=3), 2, 5.0, {16: [2.5, 2.5]}, [2.0], 1.0, half)[0] == calibrated
    # overhead (checkpoint writes, logging) scales the prediction; far behind: one more epoch, never fewer
    slow = replan(plan, 2, 44.0, {32: [20.0, 20.0]}, [2.0], 2.0, full)[0]
    assert remaining(slow, 2.0) <= left < remaining(slow + 1, 2.0) and slow < epochs
    assert replan(plan, 2, 700.0, {32: [20.0, 20.0]}, [2.0], 1.0, full)[0] == 3


def test_replanning_fills_the_budget_and_decays_to_the_end(cifar, tmp_path, monkeypatch, caplog):
    """Calibrated far too slow (5 epochs planned for 12 s): the run re-plans once the sizes still to come have run
    faster than calibrated, ends within the budget, the rate reaches min_lr at its last step, and the input sizes
    stay in order."""
    args = overrides(
        cifar,
        "trainer.time_budget_min=0.2",
        "data.train_subset=100",
        "sched=linear",
        "sched.min_lr=0",
        "trainer.resize.min_size=16",
    )
    with monkeypatch.context() as m:
        fixed_clock(m, 50.0)  # 2 s per epoch of 100 images
        with caplog.at_level(logging.INFO, logger="cvt_train"):
            trainer = Trainer(compose_train(args), tmp_path)
            assert trainer.epochs == 5
            trainer.fit()
    plan = trainer.plan
    assert plan.replans and "epochs planned instead of 5" in caplog.text
    assert trainer.progress.epoch == trainer.epochs == plan.epochs == plan.replans[-1][1] > 5
    assert time.perf_counter() - trainer.wall_start <= 12.0 * GUARD_STOP  # (an epoch can run slow on a busy CI)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.0, 0.0]
    sizes = plan.sizes
    assert len(sizes) == plan.epochs and sizes == sorted(sizes) and sizes[-1] == 32
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["plan"]
    assert saved["epochs"] == plan.epochs and saved["replans"] == plan.replans and saved["sizes"] == sizes

    # a resumed run keeps the plan as it stood at the checkpoint (sizes and rate schedule included)
    with monkeypatch.context() as m:
        calls = fixed_clock(m, 1e9)
        resumed = Trainer(compose_train([*args, f"trainer.resume={tmp_path / 'last.pt'}"]), tmp_path / "r")
    assert calls == [] and resumed.epochs == plan.epochs and resumed.input_sizes == sizes
    assert resumed.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()


def test_rebuilt_schedule_equals_one_built_for_the_new_total(cifar, tmp_path, monkeypatch):
    """Re-planning mid-run brings a scheduler built for the new total to this step: the same rates from there on as
    a run planned with that total from the start."""
    args = overrides(cifar, "trainer.time_budget_min=1", "sched=linear", "sched.warmup_epochs=1", KEEP_PLAN)
    with monkeypatch.context() as m:
        fixed_clock(m, 30.0)
        trainer = Trainer(compose_train(args), tmp_path / "a")
        other = Trainer(compose_train([*args[:-1], "trainer.time_budget_min=2"]), tmp_path / "b")  # more epochs
    for _ in range(13):  # mid-epoch 2, past the warm-up
        trainer.optimizer.step()
        trainer.scheduler.step()
        other.optimizer.step()
        other.scheduler.step()
    trainer.progress.global_step, trainer.progress.epoch = 13, 1
    trainer._set_epochs(other.epochs, 1.0, 0.0)
    for _ in range(7):
        assert trainer.scheduler.get_last_lr() == pytest.approx(other.scheduler.get_last_lr(), rel=1e-12)
        trainer.optimizer.step()
        trainer.scheduler.step()
        other.optimizer.step()
        other.scheduler.step()
