"""trainer.time_budget_min: plan a run to end, with its evaluations, within N minutes of wall time on whatever
machine it runs.

At the start of a fresh run the training step is timed on a copy of the model (its own optimizer, the run's own
first batches, so the loader's speed counts too) and an evaluation pass on a few validation batches; from those
rates and the time already spent since the process started (imports, reading and decoding the data) the plan fixes
the number of epochs, and with it the whole learning-rate schedule, before the first real step. The plan is logged
and stored in every checkpoint, so a resumed run keeps it and ends exactly where the uninterrupted run would have.
The copy's steps change nothing of the run itself: the same seed gives the same run whatever the plan measured.

The clock after that is only a guard: after each epoch the projected end is compared with the budget; a projected
overrun is a warning, and one beyond GUARD_STOP of the budget (the machine slowed down badly) stops the run at that
epoch boundary with last.pt written, said in the log.
"""

from __future__ import annotations

import copy
import logging
import math
import os
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

    def evaluations(self, epochs: int) -> int:
        """Evaluations in `epochs` epochs: every eval_every epochs, and after the last."""
        return epochs // self.eval_every + (1 if epochs % self.eval_every else 0)

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
