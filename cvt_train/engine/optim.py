"""Optimizer with weight-decay groups, and the per-iteration learning-rate schedule."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

from ..errors import UserError


def learning_rate(optim: DictConfig, global_batch: int) -> float:
    """`optim.lr` if given, else `base_lr` scaled linearly by the global batch (DeiT's rule)."""
    if optim.lr is not None:
        return float(optim.lr)
    return float(optim.base_lr) * global_batch / float(optim.base_batch_size)


def build_optimizer(model: nn.Module, optim: DictConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW / SGD; no weight decay on `model.no_weight_decay()` (norms, biases, cls tokens, pos embeds)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update instead of a dozen per tensor (AdamW, CvT-13 on CPU: 43 -> 15 ms/step),
    # and it skips a step with non-finite gradients on the device (found_inf), with no host read
    fused = bool(optim.fused) and all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    if optim.name == "sgd":  # (the names are config.py's OptimConfig choices, checked by validate)
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this run's `fused` choice (torch would take the saved one) and laying
    each state tensor out like its parameter: the fused kernel reads them as raw memory, so moments saved from a
    run with another `trainer.channels_last` would otherwise be applied to the wrong elements."""
    for saved, group in zip(state["param_groups"], optimizer.param_groups):
        if "fused" in group:
            saved["fused"] = group["fused"]
    optimizer.load_state_dict(state)
    for p, s in optimizer.state.items():
        for key, value in s.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                s[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def check_min_lr(sched: DictConfig, lr: float) -> None:
    """A decay that would end above its peak is a typo (torch's own error names neither key)."""
    if sched.name in ("linear", "cosine") and sched.min_lr > lr:
        raise UserError(
            f"sched.min_lr={sched.min_lr:g} is above the peak rate {lr:g} (optim.lr, or optim.base_lr scaled by the "
            f"global batch); the {sched.name} decay goes down to min_lr: lower sched.min_lr or raise optim.lr"
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched: DictConfig, lr: float, steps_per_epoch: int, epochs: int
) -> LRScheduler:
    """Linear warmup from `warmup_lr`, then cosine or linear to `min_lr`, constant, or multistep (x gamma at each of the
    milestone epochs, counted from the start of training); stepped once per optimizer step."""
    check_min_lr(sched, lr)
    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(round(sched.warmup_epochs * steps_per_epoch)), total - 1)
    if sched.name == "constant":  # (config.py's SchedConfig choices, checked by validate)
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif sched.name == "linear":  # straight down to min_lr at the last step (decay to zero, for short runs)
        main = LinearLR(
            optimizer, start_factor=1.0, end_factor=sched.min_lr / lr if lr > 0 else 1.0, total_iters=total - warmup
        )
    elif sched.name == "multistep":  # (SequentialLR restarts the count at the warmup's end: milestones shift back)
        steps = sorted(max(1, round(m * steps_per_epoch) - warmup) for m in sched.milestones)
        main = MultiStepLR(optimizer, milestones=steps, gamma=sched.gamma)
    else:
        main = CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=sched.min_lr)
    if warmup == 0:
        return main
    start = min(1.0, sched.warmup_lr / lr) if lr > 0 else 1.0
    ramp = LinearLR(optimizer, start_factor=start, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
