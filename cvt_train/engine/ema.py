"""The EMA of the weights (trainer.ema): updated on the device after each optimizer step, with no host read."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class WeightEma:
    """EMA of the weights and buffers (BatchNorm statistics) kept in a `torch.optim.swa_utils.AveragedModel`, whose
    state dict (`module.*`, `n_averaged`) is what checkpoints store.

    Its own `update_parameters` reads `n_averaged` back to the host on every call (a GPU stall per step), so the
    update is done here instead, as fused `_foreach` ops over tensor lists made once (timm's ModelEmaV3 does the
    same), with the update count on the host (the optimizer step) and the skip decision a device tensor.
    Decay with warmup: min(decay, (1 + n) / (10 + n)) for the n-th update (n = 0: a plain copy, as AveragedModel).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool, device: torch.device):
        # device=: every tensor a collective (sync_buffers) touches must be on the rank's device, n_averaged too
        self.averaged = AveragedModel(model, device=device, use_buffers=True)
        self.decay, self.warmup = decay, warmup
        pairs = list(zip(self.averaged.module.state_dict().values(), model.state_dict().values()))
        self._floats = ([e for e, m in pairs if e.is_floating_point()], [m for e, m in pairs if e.is_floating_point()])
        self._others = (
            [e for e, m in pairs if not e.is_floating_point()],  # num_batches_tracked: copied
            [m for e, m in pairs if not e.is_floating_point()],
        )

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def weight(self, n: int) -> float:
        """How far the n-th update (0-based) moves the average towards the model: 1 - decay."""
        if n == 0:
            return 1.0
        return 1.0 - (min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay)

    @torch.no_grad()
    def update(self, n: int, keep: torch.Tensor) -> None:
        """The n-th update; `keep` (0-dim float on the device, 0 or 1) is 0 for a skipped optimizer step, which
        leaves the average as it was: ema * (1 - w) + model * w with w = keep * weight(n), all on the device.
        (One transient copy of the weights: no fused lerp takes a device-tensor weight on its fast path.)"""
        ema, model = self._floats
        w = keep * self.weight(n)
        torch._foreach_mul_(ema, 1.0 - w)
        torch._foreach_add_(ema, torch._foreach_mul(model, w))
        if self._others[0]:
            torch._foreach_copy_(*self._others)
        self.averaged.n_averaged.add_(1)
