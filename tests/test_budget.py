"""trainer.time_budget_min: the plan's arithmetic, a budgeted run that stores its plan and resumes exactly, the
calibration leaving the run unchanged, and the guard that stops a run whose machine slowed down badly."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import compose_train
from fakedata import write_cifar10_python
from test_train import FAST, _stop_at

from cvt_train.engine import trainer as trainer_module
from cvt_train.engine.budget import MARGIN, plan_epochs
from cvt_train.engine.trainer import Trainer, train


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=500, n_test=200)  # 10 steps of 50


def overrides(cifar, *extra):
    return [*FAST, "data=cifar10", f"data.root={cifar}", "trainer.precision=fp32", *extra]


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
    args = overrides(cifar, "trainer.time_budget_min=1", "trainer.epochs=50")
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
            compose_train(overrides(cifar, "trainer.time_budget_min=0.5", "trainer.eval_tta=flip", *resize)),
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


def test_guard_stops_a_run_that_falls_far_behind_its_plan(cifar, tmp_path, monkeypatch, caplog):
    # calibrated at a rate no CPU reaches: the first epoch takes far longer than planned
    with monkeypatch.context() as m:
        fixed_clock(m, 1e6, 1e7)
        with caplog.at_level(logging.INFO, logger="cvt_train"):
            trainer = Trainer(compose_train(overrides(cifar, "trainer.time_budget_min=0.05")), tmp_path)
            assert trainer.epochs > 100
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
