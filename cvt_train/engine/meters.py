"""What the training loop measures: its losses and non-finite steps on the device (StepMeters, read at log points
only), and on the host the epoch's wall time, images and time spent waiting for the data loader (EpochClock)."""

from __future__ import annotations

import itertools
import time

import torch
from tqdm import tqdm


class StepMeters:
    """What the loop needs to know about its steps, kept on the device and read back only at log points (one host
    read every `trainer.log_every` steps instead of several per step: each read lets the GPU run dry).

    Per optimizer step: the summed finite losses, the steps skipped for non-finite gradients, and the run of
    consecutive steps with a non-finite loss, with the global step at which it first reached `max_nonfinite`.
    """

    def __init__(self, device: torch.device, max_nonfinite: int):
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self.max_nonfinite = max_nonfinite
        self.window_loss, self.window_batches, self.window_skipped = zero(), zero(), zero()
        self.epoch_loss, self.epoch_batches = zero(), zero()
        self.bad_window = zero()  # a non-finite loss in the accumulation window in progress
        self.streak, self.tripped_at = zero(), zero()  # tripped_at: global step (1-based) the streak hit the limit
        self.step = zero()  # the global step, counted on the device too (no host-to-device copy per step)

    def add_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        value = torch.where(finite, loss, 0.0)
        for total in (self.window_loss, self.epoch_loss):
            total.add_(value)
        for count in (self.window_batches, self.epoch_batches):
            count.add_(finite)
        self.bad_window.logical_or_(~finite)

    def end_step(self, skipped: torch.Tensor) -> None:
        self.step.add_(1)
        self.window_skipped.add_(skipped)
        self.streak.add_(1).mul_(self.bad_window)  # +1 on a bad step, back to 0 on a good one
        newly = (self.streak >= self.max_nonfinite) & (self.tripped_at == 0)
        self.tripped_at.copy_(torch.where(newly, self.step, self.tripped_at))
        self.bad_window.zero_()

    def read_window(self) -> tuple[float, int, int, int]:
        """(mean loss, batches, skipped steps) since the last read, and the tripped step (0 if none): one read."""
        loss, batches, skipped, tripped = torch.stack(
            [self.window_loss, self.window_batches, self.window_skipped, self.tripped_at]
        ).tolist()
        for t in (self.window_loss, self.window_batches, self.window_skipped):
            t.zero_()
        return loss / batches if batches else float("nan"), int(batches), int(skipped), int(tripped)

    def read_epoch(self) -> float:
        loss, batches = torch.stack([self.epoch_loss, self.epoch_batches]).tolist()
        self.epoch_loss.zero_(), self.epoch_batches.zero_()
        return loss / batches if batches else float("nan")


class EpochClock:
    """One epoch's wall time, images seen and time blocked waiting for the next batch, and its progress bar."""

    def __init__(self, steps: int, first: int, desc: str, show: bool):
        self.steps, self.first = steps, first
        self.seen, self.waited, self.start, self.end = 0, 0.0, time.perf_counter(), None
        self.bar = tqdm(
            total=steps, initial=first, desc=desc, disable=not show, dynamic_ncols=True, leave=False, mininterval=1.0
        )

    def batches(self, loader):
        """(step, batch) for steps `first` to `steps` - 1 of the epoch (the loader may hold more: partial
        accumulation windows, trainer.max_steps_per_epoch), timing each wait and counting the images."""
        iterator = iter(loader)
        try:
            for step in itertools.count(self.first):
                start = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                self.waited += time.perf_counter() - start
                if step >= self.steps:
                    return
                self.seen += batch[0].shape[0]
                yield step, batch
        finally:  # an early exit closes the loader's generator now (it stops its workers)
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    @property
    def seconds(self) -> float:
        return max((self.end or time.perf_counter()) - self.start, 1e-9)

    def rates(self, world_size: int) -> tuple[float, float]:
        """(images per second over all ranks, fraction of the time spent waiting for data) so far."""
        seconds = self.seconds
        return self.seen * world_size / seconds, self.waited / seconds

    def close(self) -> None:
        """The epoch's training is done: stop the clock, remove the bar."""
        self.end = time.perf_counter()
        self.bar.close()
        self.bar = None
