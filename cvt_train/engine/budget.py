"""trainer.time_budget_min: plan a run to end, with its evaluations, within N minutes of wall time on whatever
machine it runs.

At the start of a fresh run the training step is timed on a copy of the model (its own optimizer, the run's own
first batches, so the loader's speed counts too) and an evaluation pass on a few validation batches; from those
rates and the time already spent since the process started (imports, reading and decoding the data) the plan fixes
the number of epochs, and with it the whole learning-rate schedule, before the first real step. The plan is logged
and stored in every checkpoint, so a resumed run keeps it and ends exactly where the uninterrupted run would have.
The copy's steps change nothing of the run itself: the same seed gives the same run whatever the plan measured.

After each epoch the plan is made again (`trainer.time_budget_replan`, on by default) from what the run's own epochs
and evaluations took: the calibration can be 20% off on a busy or throttling machine (measured on a 2-core CPU), and
a plan kept to would end minutes early or late. The remaining epochs grow or shrink to fill the budget, and the
learning-rate schedule and the input sizes of the epochs to come follow the new total (the rate moves by a few
percent at a change, never back up to its warm-up). Each change is logged and stored in the plan; a resumed run
keeps the plan as it stood and goes on re-planning from its own clock, so with re-planning on it is no longer equal
bit for bit to the uninterrupted run (`trainer.time_budget_replan=false` keeps the first plan, exactly resumable).

The clock is also a guard: a projected overrun that re-planning cannot absorb is a warning, and one beyond
GUARD_STOP of the budget (the machine slowed down badly) stops the run at that epoch boundary with last.pt written,
said in the log.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .precision import autocast
from .resize import resize_batch

log = logging.getLogger("cvt_train")

# Untimed steps (the loader's workers starting, the allocator, oneDNN/cuDNN choices), then timed ones. With 3 + 12
# steps, cvt_cifar_tiny's epochs then ran 5-12% faster than calibrated (a 2-core CPU): epochs left unplanned.
CALIBRATION_WARMUP, CALIBRATION_STEPS = 5, 30
EVAL_CALIBRATION_BATCHES = 3
# Of the budget, kept for checkpoint writes, the last log lines and step-time noise. 3% was too little: on a 2-core
# CPU the epochs of one run ran at 0.83-1.12x the calibrated rate, and a 28-min plan then took 30 minutes.
MARGIN = 0.07
GUARD_STOP = 1.10  # projected end beyond 110% of the budget: stop at the epoch boundary
# Re-planning predicts from the run's own epochs, so it needs less margin than the first plan: the remaining time is
# padded by REPLAN_SLACK (epochs drift by a few percent), and END_MARGIN of the budget is kept for the last writes.
REPLAN_SLACK, END_MARGIN = 0.05, 0.02
# Hysteresis, so the plan (and with it the rate) does not flap while the prediction moves by an epoch or two from
# one epoch to the next: a plan grows only when REPLAN_GROW or more epochs more fit, and shrinks only when it no
# longer fits even without REPLAN_SLACK. Without it a 28-min CPU run re-planned 15 times by +-1; with growth alone
# held back, another still re-planned 10 times (38, 40, 43, 45, 43, 42, 45, 43, 45, 42, 44); with both, three runs
# re-planned 4, 1 and 5 times (the 5: three growths, then two shrinks when 32-px epochs ran slower than predicted).
REPLAN_GROW = 2
# Nor does a plan grow once HOLD_TAIL of it has run: the linear decay is then near zero, and growing it re-stretches
# the tail (a 10-min CPU run went from 24 to 26 planned epochs after its 23rd, raising the rate from ~1/24 to ~3/26 of
# the peak). Shrinking stays allowed: that is the guard's side.
HOLD_TAIL = 0.9


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


@dataclass
class Plan:
    """What the budget planned; stored in checkpoints as a dict (`asdict`)."""

    budget_min: float
    epochs: int
    train_images_per_s: float  # all ranks together, at full size
    eval_images_per_s: float  # all ranks together, forwards of the evaluated models included
    spent_s: float  # wall time before the first step (process start-up, data, calibration)
    epoch_s: float  # predicted training time of one epoch at full size
    eval_s: float  # predicted time of one evaluation
    eval_every: int = 1
    epoch_times: list[float] = field(default_factory=list)  # per planned epoch, where they differ (trainer.resize)
    size_costs: dict[int, float] = field(default_factory=dict)  # {input size: epoch cost relative to full size}
    sizes: list[int] = field(default_factory=list)  # the input size of every planned epoch (trainer.resize)
    replans: list[list[int]] = field(default_factory=list)  # [after epoch, new epochs] at each change of the plan

    def evaluations(self, epochs: int) -> int:
        """Evaluations in `epochs` epochs: every eval_every epochs, and after the last."""
        return epochs // self.eval_every + (1 if epochs % self.eval_every else 0)

    def epoch_time(self, size: int) -> float:
        """Calibrated training time of one epoch at input size `size`."""
        return self.size_costs.get(size, 1.0) * self.epoch_s

    def seconds(self, epochs: int) -> float:
        """Predicted wall time of the first `epochs` epochs with their evaluations."""
        training = sum(self.epoch_times[:epochs]) if self.epoch_times else epochs * self.epoch_s
        return training + self.evaluations(epochs) * self.eval_s

    @property
    def total_s(self) -> float:
        return self.spent_s + self.seconds(self.epochs)


def plan_epochs(
    budget_min: float,
    spent_s: float,
    train_images_per_s: float,
    eval_images_per_s: float,
    images_per_epoch: int,
    val_images: int,
    eval_every: int,
    epoch_costs: Callable[[int], list[float]] | None = None,
) -> Plan:
    """The most epochs whose training and evaluations (every eval_every epochs and after the last) fit in what is
    left of the budget after spent_s, less a MARGIN; at least 1. epoch_costs(n): the cost of each epoch of an n-epoch
    run relative to a full-size one, where they differ (trainer.resize: smaller inputs early)."""
    epoch_s = images_per_epoch / train_images_per_s
    eval_s = val_images / eval_images_per_s if val_images else 0.0
    plan = Plan(budget_min, 1, train_images_per_s, eval_images_per_s, spent_s, epoch_s, eval_s, eval_every)
    left = budget_min * 60 * (1 - MARGIN) - spent_s
    cheapest = min(epoch_costs(1000)) if epoch_costs else 1.0
    epochs = max(1, math.floor(left / (cheapest * epoch_s + eval_s / eval_every)))
    while True:  # from an upper bound down (the last epoch's evaluation comes on top when eval_every does not
        if epoch_costs:  # divide the epochs; with sizes that grow, fewer epochs have fewer cheap ones)
            plan.epoch_times = [c * epoch_s for c in epoch_costs(epochs)]
        if epochs == 1 or plan.seconds(epochs) <= left:
            break
        epochs -= 1
    plan.epochs = epochs
    return plan


def replan(
    plan: Plan,
    done: int,
    elapsed_s: float,
    epoch_s: dict[int, list[float]],
    eval_s: list[float],
    overhead: float,
    sizes_for: Callable[[int], list[int]],
) -> tuple[int, float, float]:
    """The most epochs, at least done + 1, that end within the budget (less END_MARGIN) at the pace of the run's own
    epochs; the plan's own epochs while they fit unpadded and either fewer than REPLAN_GROW more would fit padded or
    HOLD_TAIL of them have run.
    done: epochs run so far; elapsed_s: wall time since the first step; epoch_s: {input size: seconds of each whole
    epoch at that size} and eval_s: seconds of each evaluation, both measured in this process (their medians
    predict the epochs and evaluations to come); overhead: elapsed wall time over measured epoch and evaluation
    time (checkpoint writes, logging); sizes_for(n): the input size of every epoch of an n-epoch run. A size not yet
    run is predicted from the calibration, scaled by how much slower than calibrated the sizes that did run were
    (never faster: small inputs outran their calibration by 13% on a 2-core Ice Lake while 32 px then ran 16% slower
    than its own, and extrapolating the gain grew a plan by 5 epochs that had to shrink by 8).
    Returns (epochs, the pace: measured over calibrated epoch time, the predicted end in seconds of the budget)."""
    # medians: the first epoch and evaluation carry torch.compile's compilation (a minute on a GPU), already paid
    paces = [t / plan.epoch_time(s) for s, ts in epoch_s.items() for t in ts]
    pace = statistics.median(paces) if paces and plan.epoch_s > 0 else 1.0
    per_size = {s: statistics.median(t) for s, t in epoch_s.items() if t}
    per_eval = statistics.median(eval_s) if eval_s else plan.eval_s * pace
    evals_run = (done - 1) // plan.eval_every  # this boundary's own evaluation, if it has one, is still to come
    left = plan.budget_min * 60 * (1 - END_MARGIN) - plan.spent_s - elapsed_s

    def remaining_s(epochs: int, slack: float = REPLAN_SLACK) -> float:
        sizes = sizes_for(epochs)[done:]
        train = sum(per_size.get(s, plan.epoch_time(s) * max(pace, 1.0)) for s in sizes)
        return (train + (plan.evaluations(epochs) - evals_run) * per_eval) * overhead * (1 + slack)

    epochs = done + 1
    while epochs < 100 * (plan.epochs + 1) and remaining_s(epochs + 1) <= left:
        epochs += 1
    still_fits = plan.epochs > done and remaining_s(plan.epochs, slack=0.0) <= left
    if still_fits and (epochs < plan.epochs + REPLAN_GROW or done >= HOLD_TAIL * plan.epochs):
        epochs = plan.epochs
    return epochs, pace, plan.spent_s + elapsed_s + remaining_s(epochs, slack=0.0)  # the end as predicted, unpadded


def calibrate(trainer, eval_forwards: int, sizes: list[int]) -> tuple[dict[int, float], float]:
    """({input size: training images/s}, evaluation images/s) of this rank, timed on a copy of the model with its
    own optimizer over the run's first batches (resized to each of `sizes`), and over a few validation batches with
    `eval_forwards` forwards per batch (the model, its flip, the EMA). Nothing of the run changes: the copy is thrown
    away, the generator restored."""
    from .optim import build_optimizer

    cfg, device = trainer.cfg, trainer.dist.device
    model = copy.deepcopy(trainer.model).train()
    optimizer = build_optimizer(model, cfg.optim, 1e-12)  # a step's cost does not depend on the rate
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)
    rng = torch.get_rng_state()
    train_rates = {}
    for size in sizes:
        seen, start = 0, time.perf_counter()  # (an epoch shorter than the warm-up is timed whole)
        batches = trainer.data.train_batches(0)
        try:
            for i, (images, targets) in enumerate(batches):
                if i == CALIBRATION_WARMUP:
                    _sync(device)
                    seen, start = 0, time.perf_counter()
                with autocast(device, trainer.amp_dtype):
                    loss = loss_fn(model(resize_batch(images, size)).float(), targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seen += images.shape[0]
                if i + 1 == CALIBRATION_WARMUP + CALIBRATION_STEPS:
                    break
        finally:
            batches.close()
        _sync(device)
        train_rates[size] = seen / max(time.perf_counter() - start, 1e-9)
    model.eval()
    seen, start = 0, None
    with torch.no_grad():
        val = trainer.data.val_batches()
        try:
            for i, (images, _) in enumerate(val):
                if i == 1:
                    _sync(device)
                    seen, start = 0, time.perf_counter()
                for _ in range(eval_forwards):
                    with autocast(device, trainer.amp_dtype):
                        model(images)
                seen += images.shape[0]
                if i == EVAL_CALIBRATION_BATCHES:
                    break
        finally:
            val.close()
    _sync(device)
    full_rate = train_rates[max(sizes)]
    eval_rate = seen / (time.perf_counter() - start) if start is not None and seen else full_rate * 3
    torch.set_rng_state(rng)
    del model, optimizer
    return train_rates, eval_rate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(plan: Plan) -> str:
    return (
        f"time budget {plan.budget_min:g} min: {plan.epochs} epochs planned (training {plan.train_images_per_s:.0f} "
        f"img/s -> {plan.epoch_s:.1f} s per epoch, evaluation {plan.eval_s:.1f} s x "
        f"{plan.evaluations(plan.epochs)}, {plan.spent_s:.0f} s spent before the first step; predicted "
        f"end at {plan.total_s / 60:.1f} min)"
        + (f"; epochs of smaller inputs take {_shares(plan)}" if plan.epoch_times else "")
    )


def _shares(plan: Plan) -> str:
    """'0.41x, 0.63x' of a full-size epoch: the distinct costs of the planned epochs, cheapest first."""
    return ", ".join(f"{t / plan.epoch_s:.2f}x" for t in sorted(set(plan.epoch_times)) if t < plan.epoch_s)
