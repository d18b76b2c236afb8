"""trainer.resize (progressive resizing): the size schedule, the batches the model is fed, the budget that plans
with each size's own speed, exact resume, and the one-line refusals."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_train
from fakedata import write_cifar10_python
from test_budget import fixed_clock
from test_train import FAST, _stop_at
from torchvision.transforms.v2.functional import resize

from cvt_train.engine.budget import MARGIN, plan_epochs
from cvt_train.engine.resize import all_sizes, describe, input_sizes, resize_batch
from cvt_train.engine.trainer import Trainer, train
from cvt_train.errors import UserError


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=500, n_test=200)  # 10 steps of 50


def overrides(cifar, *extra):
    return [*FAST, "data=cifar10", f"data.root={cifar}", "trainer.precision=fp32", *extra]


def rc(min_size=16, ramp=(0.0, 0.75), multiple=8):
    return SimpleNamespace(min_size=min_size, ramp=list(ramp), multiple=multiple)


def test_size_schedule():
    # 16 + 16 * (epoch / 48) / 0.75, to the nearest multiple of 8: below 20 until epoch 9, below 28 until epoch 27
    assert input_sizes(48, rc(), 32) == [16] * 9 + [24] * 18 + [32] * 21
    assert describe(input_sizes(48, rc(), 32)) == "16px for epochs 1-9, 24px for epochs 10-27, 32px for epochs 28-48"
    assert input_sizes(4, rc(ramp=(0.5, 0.5)), 32) == [16, 16, 32, 32]  # a step at half the run
    assert input_sizes(5, rc(min_size=None), 32) == [32] * 5  # off
    assert input_sizes(3, rc(min_size=20), 32) == [20, 24, 32]  # min_size itself need not be a multiple
    assert all_sizes(rc(), 32) == [16, 24, 32]


def test_resize_batch_is_antialiased_bilinear():
    x = torch.randn(2, 3, 32, 32)
    assert resize_batch(x, 32) is x
    assert torch.equal(resize_batch(x, 16), resize(x, [16, 16], antialias=True))  # torchvision's antialiased resize


def test_plan_uses_each_epochs_own_cost():
    # 10 min, 60 s spent; a full-size epoch takes 60 s, the small one 20 s; evaluations 1 s, every epoch
    def costs(n):
        return [1 / 3 if s == 16 else 1.0 for s in input_sizes(n, rc(ramp=(0.5, 0.5)), 32)]

    plan = plan_epochs(10, 60.0, 100.0, 1000.0, 6000, 1000, eval_every=1, epoch_costs=costs)
    left = 600 * (1 - MARGIN) - 60
    fits = [n for n in range(1, 100) if 60 * sum(costs(n)) + n * 1.0 <= left]
    assert plan.epochs == max(fits) == 12 and plan_epochs(10, 60.0, 100.0, 1000.0, 6000, 1000, 1).epochs == 8
    assert plan.epoch_times == pytest.approx([20.0] * 6 + [60.0] * 6) and plan.seconds(3) == pytest.approx(63)


def test_the_model_is_fed_the_scheduled_sizes(cifar, tmp_path, caplog):
    trainer = Trainer(
        compose_train(
            overrides(cifar, "trainer.epochs=4", "trainer.resize.min_size=16", "trainer.resize.ramp=[0,0.5]")
        ),
        tmp_path,
    )
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
    with caplog.at_level(logging.INFO, logger="cvt_train"):
        trainer.fit()
    assert [s for training, s in seen if training] == [16] * 10 + [24] * 10 + [32] * 20
    assert {s for training, s in seen if not training} == {32}  # evaluation at full size
    assert "progressive resizing: 16px for epoch 1, 24px for epoch 2, 32px for epochs 3-4" in caplog.text


def test_budgeted_resized_run_plans_per_size_and_resumes_exactly(cifar, tmp_path, monkeypatch, caplog):
    # 10 min less the margin: 558 s. An epoch of 500 images takes 167 s at 32 (3 img/s) and 42 s at 16 (12 img/s);
    # evaluations of 200 images 0.2 s. 5 epochs [16, 16, 16, 32, 32] take 459 s, 6 take 626 s. (Slow rates: the
    # real epochs, far faster, never trip the guard.)
    args = overrides(
        cifar,
        "trainer.time_budget_min=10",
        "trainer.time_budget_replan=false",  # (the real epochs, far faster, would otherwise fill the 10 minutes)
        "trainer.resize.min_size=16",
        "trainer.resize.ramp=[0.5,0.5]",
    )
    with monkeypatch.context() as m:
        calls = fixed_clock(m, {16: 12.0, 32: 3.0})
        with caplog.at_level(logging.INFO, logger="cvt_train"):
            train(compose_train(args), tmp_path / "full")
    assert calls == [(1, [16, 32])] and "5 epochs planned" in caplog.text and "take 0.25x" in caplog.text
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert full["plan"]["epochs"] == 5 and full["epoch"] == 5
    assert full["plan"]["epoch_times"] == pytest.approx([500 / 12] * 3 + [500 / 3] * 2)

    with monkeypatch.context() as m:
        fixed_clock(m, {16: 12.0, 32: 3.0})
        _stop_at(m, 15)  # mid-epoch 2, at 16x16
        train(compose_train(args), tmp_path / "cut")
    with monkeypatch.context() as m:
        calls = fixed_clock(m, 1e9)  # resumed: the stored plan, no calibration
        train(compose_train([*args, "trainer.resume=auto"]), tmp_path / "cut")
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert calls == [] and resumed["epoch"] == 5
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["trainer.resize.min_size=40"], "trainer.resize.min_size=40: larger than data.image_size=32"),
        (["trainer.resize.min_size=1", "model.stages.0.embed=patch"], "trainer.resize.min_size=1: at 1x1"),
        (["trainer.resize.min_size=16", "trainer.resize.ramp=[0.8,0.2]"], r"trainer.resize.ramp=\[0.8, 0.2\]"),
        (["trainer.resize.min_size=16", "trainer.resize.ramp=[0,2]"], r"trainer.resize.ramp=\[0.0, 2.0\]: expected"),
    ],
)
def test_bad_resize_settings_are_refused_in_one_line(cifar, tmp_path, extra, message):
    with pytest.raises(UserError, match=message) as e:
        Trainer(compose_train(overrides(cifar, *extra)), tmp_path)
    assert "\n" not in str(e.value)
