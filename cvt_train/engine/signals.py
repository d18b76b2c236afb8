"""Stop signals: SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 become a flag the training loop checks after optimizer steps,
so that a run stops at a step it can resume from (README: Resume; docs/reliability.md: Stop signals)."""

from __future__ import annotations

import signal

import torch

from .distributed import DistInfo, all_reduce_max

# SIGUSR1: what `sbatch --signal` sends by convention; SIGUSR2: submitit's preemption / time-out signal.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


class StopRequest:
    """Turns SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 into a flag the loop checks after each optimizer step."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in STOP_SIGNALS:
            current = signal.getsignal(s)
            if s == signal.SIGTERM and getattr(current, "__module__", "").startswith("submitit"):
                continue  # submitit ignores SIGTERM on purpose and acts on its own signal (SIGUSR2): so do we
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def pass_on(self) -> None:
        """After last.pt is written: hand the signal to the handler that was there before, if Python installed one
        (submitit's requeues the job; a Hydra launcher's or the user's gets its say)."""
        previous = self._previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)

    def requested(self, dist: DistInfo) -> bool:
        """Whether a stop signal came: this process's flag alone, or, under DDP, whether any rank got one (so that
        every rank stops at the same step; call it at the same steps on every rank); adopts its number.

        Under torchrun a SIGTERM also comes when another rank died (torchrun stops the survivors before it restarts
        the group): then this all-reduce, like the step's own, fails (gloo at once, NCCL at trainer.dist_timeout_min)
        and the process ends with one line (train.py) without saving: a step is never finished, nor last.pt written,
        without every rank. The last.pt already written is where the restarted group resumes."""
        if not dist.enabled:
            return self.signum is not None
        signum = int(all_reduce_max(torch.full((1,), self.signum or 0, device=dist.device)).item())
        if signum and self.signum is None:
            self.signum = signum
        return signum > 0
