"""trainer.profile=true (the `debug=profile` preset, conf/debug/profile.yaml): torch.profiler over the first training
steps of rank 0, a trace for TensorBoard's profiler view in RUN/profile/ and a table of the costliest ops in
RUN/profile.txt. A debugging tool of the training steps alone, so it lives beside its preset, not in the trainer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("cvt_train")


class StepProfiler(torch.profiler.profile):
    """torch.profiler over training steps 2-7 (after a warm-up), trace written for TensorBoard's profiler view."""

    def __init__(self, run_dir: Path):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        super().__init__(
            activities=activities,
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=5, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(run_dir / "profile")),
        )
        self.run_dir = run_dir

    def after_step(self, global_step: int) -> None:
        """A Trainer.step_hooks entry: the schedule counts optimizer steps."""
        self.step()

    def write(self) -> None:
        """After training (the profiler stopped): the ops that took the most CPU time, as a table."""
        table = self.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        (self.run_dir / "profile.txt").write_text(table)
        log.info(
            "profile of the first training steps: %s (trace for TensorBoard in %s)",
            self.run_dir / "profile.txt",
            self.run_dir / "profile",
        )
