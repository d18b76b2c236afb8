"""The optimizer: fused AdamW updates as the reference loop does, and resumes into any memory format."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import tiny_model
from omegaconf import OmegaConf

from cvt_train.engine.optim import build_optimizer, build_scheduler, load_optimizer_state
from cvt_train.errors import UserError


def adamw(fused: bool):
    return OmegaConf.create(
        {
            "name": "adamw",
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.05,
            "fused": fused,
            "momentum": 0.9,
            "nesterov": False,
        }
    )


def steps(model, optimizer, grads, n: int) -> None:
    for i in range(n):
        for p, g in zip(model.parameters(), grads):
            p.grad = torch.empty_like(p).copy_(g * (i + 1))  # a gradient laid out like its parameter, as autograd's
        optimizer.step()


def grads_for(model, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in model.parameters()]


def assert_same_params(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_adamw_equals_the_for_loop():
    model = tiny_model()
    other = copy.deepcopy(model)
    grads = grads_for(model)
    steps(model, build_optimizer(model, adamw(fused=True), lr=1e-2), grads, 3)
    steps(other, build_optimizer(other, adamw(fused=False), lr=1e-2), grads, 3)
    assert_same_params(model, other)


@pytest.mark.parametrize("saved_fused", [False, True])
def test_resume_into_channels_last_keeps_the_run_fused_and_exact(saved_fused):
    """Moments saved by a run without channels_last, resumed by a fused optimizer over channels_last weights:
    the same updates as a run that never stopped."""
    model = tiny_model()
    grads = grads_for(model)
    opt = build_optimizer(model, adamw(fused=saved_fused), lr=1e-2)
    steps(model, opt, grads, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)

    resumed = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert any(p.ndim == 4 and not p.is_contiguous() for p in resumed.parameters())  # the layouts really differ
    resumed_opt = build_optimizer(resumed, adamw(fused=True), lr=1e-2)
    buffer.seek(0)
    load_optimizer_state(resumed_opt, torch.load(buffer, weights_only=True))
    assert all(g["fused"] for g in resumed_opt.param_groups)  # this run's choice, not the checkpoint's

    steps(model, opt, grads, 2)
    steps(resumed, resumed_opt, grads, 2)
    assert_same_params(model, resumed)


@pytest.mark.parametrize("warmup", [0, 2])
def test_multistep_multiplies_by_gamma_at_each_milestone_epoch(warmup):
    """The zoo recipe's schedule: 0.1, x0.2 at epochs 60, 120, 160 (here 3, 6, 8 epochs of 5 steps), after an
    optional linear warmup that does not move the milestones."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = OmegaConf.create(
        {
            "name": "multistep",
            "warmup_epochs": warmup,
            "warmup_lr": 1e-3,
            "min_lr": 0,
            "milestones": [3, 6, 8],
            "gamma": 0.2,
        }
    )
    scheduler = build_scheduler(opt, sched, 0.1, steps_per_epoch=5, epochs=10)
    rates = rates_over(opt, scheduler, 49)
    expected = [0.1 * 0.2 ** sum(step >= 5 * m for m in (3, 6, 8)) for step in range(50)]
    assert rates[5 * warmup :] == pytest.approx(expected[5 * warmup :], rel=1e-9)
    if warmup:
        assert rates[0] == pytest.approx(1e-3) and rates[0] < rates[5] < rates[10]


def test_linear_decays_straight_to_min_lr_at_the_last_step():
    """sched=linear: the warmup, then a straight line from the peak to min_lr, reached at the last step."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=4e-3)
    sched = OmegaConf.create({"name": "linear", "warmup_epochs": 1, "warmup_lr": 1e-6, "min_lr": 0.0})
    scheduler = build_scheduler(opt, sched, 4e-3, steps_per_epoch=4, epochs=5)  # 4 warmup + 16 decay steps
    rates = rates_over(opt, scheduler, 20)
    assert rates[0] == pytest.approx(1e-6) and rates[4] == pytest.approx(4e-3)
    assert rates[4:] == pytest.approx([4e-3 * (1 - k / 16) for k in range(17)], abs=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_a_decay_ending_above_its_peak_is_refused_in_one_line(name):
    """The rate derived from base_lr is known only here (validate sees optim.lr alone): min_lr above it is a typo."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = OmegaConf.create({"name": name, "warmup_epochs": 0, "warmup_lr": 1e-6, "min_lr": 2e-3})
    with pytest.raises(UserError, match=r"^sched.min_lr=0.002 is above the peak rate 0.001 .*lower sched.min_lr"):
        build_scheduler(opt, sched, 1e-3, steps_per_epoch=4, epochs=5)
    build_scheduler(opt, OmegaConf.merge(sched, {"min_lr": 1e-3}), 1e-3, steps_per_epoch=4, epochs=5)  # equal: fine


def rates_over(opt: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """The learning rate before each of `steps` optimizer steps and after the last (steps + 1 values)."""
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        rates.append(opt.param_groups[0]["lr"])
    return rates
