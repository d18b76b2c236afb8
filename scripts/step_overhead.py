"""What the training loop adds to the model's own step, measured in one process: when a run's images/s falls short of
cvt-bench's, is it the loop or the machine?

    python scripts/step_overhead.py experiment=cifar10_cpu data.root=/data/cifar10 trainer.resize.min_size=null

Takes cvt-train's overrides (the budget is off: `trainer.time_budget_min=null`, so nothing is calibrated), builds
the Trainer in a temporary run directory, takes the run's first batch and times, in alternating order (A B C, then
C B A, so that a drift of the machine's pace falls on all three), at the full input size (trainer.resize is not
applied):

    model alone   forward under the trainer's autocast, cross-entropy, backward, optimizer step, zero_grad: the step
                  cvt-bench times, on the trainer's own model, optimizer and batch
    train_step    Trainer.train_step on the same batch: label smoothing, the gradient norm and its on-device skip,
                  the scheduler, the meters, the per-step seed
    loader + train_step   the next batch from the loader, then train_step on it: the loop's step, with the loader's
                  worker (or, with data.num_workers=0, the main process) making the next batch on the same cores

and then the loader alone (the next batch, no step). Prints the medians, images/s and the ratios to the model alone.
Separate processes minutes apart are no way to compare the two on a shared or throttling machine: on a 2-core Zen 5,
cvt-bench alone read 1,373 to 1,856 images/s for the same model within twenty minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from cvt_train import config as _config  # noqa: F401  (registers the schemas before compose)
from cvt_train.bench import synchronizer
from cvt_train.engine.precision import autocast
from cvt_train.engine.trainer import Trainer

DEFAULTS = ["trainer.time_budget_min=null", "trainer.progress=false"]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(trainer: Trainer, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds of each kind of step (see the module's docstring)."""
    batches = trainer.data.train_batches(0)
    images, targets = next(batches)
    sync = synchronizer(trainer.dist.device)
    step = 0

    def model_alone() -> None:
        with autocast(trainer.dist.device, trainer.amp_dtype):
            loss = F.cross_entropy(trainer.train_model(images).float(), targets)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync()

    def train_step(x: torch.Tensor = images, y: torch.Tensor = targets) -> None:
        nonlocal step
        trainer.train_step(x, y, 0, step)
        step += 1
        sync()

    def loader() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # a short epoch: start it again
            batches = trainer.data.train_batches(0)
            return next(batches)

    def loader_and_step() -> None:
        train_step(*loader())

    kinds = {"model alone": model_alone, "train_step": train_step, "loader + train_step": loader_and_step}
    times: dict[str, list[float]] = {name: [] for name in [*kinds, "loader"]}
    for i in range(warmup + rounds):
        order = list(kinds.items()) if i % 2 == 0 else list(kinds.items())[::-1]
        for name, fn in order:
            seconds = timed(fn)
            if i >= warmup:
                times[name].append(seconds)
    for _ in range(rounds):  # the batches alone: how fast they come when the model does not compete for the cores
        times["loader"].append(timed(loader))
    batches.close()
    return {name: statistics.median(t) for name, t in times.items()}


def report(medians: dict[str, float], batch: int) -> str:
    alone = medians["model alone"]
    rows = [
        f"{name:22s} {s * 1e3:8.1f} ms  {batch / s:8.0f} images/s" + (f"  {s / alone:.3f}x" if name != "loader" else "")
        for name, s in medians.items()
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    args, overrides = parser.parse_known_args(argv)
    with initialize_config_module("cvt_train.conf", version_base="1.3"):
        cfg = compose("train", overrides=DEFAULTS + overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        try:
            trainer.train_model.train()
            medians = measure(trainer, args.rounds, args.warmup)
        finally:
            trainer.close(hparams=False)
    print(report(medians, cfg.data.batch_size))
    return medians


if __name__ == "__main__":
    main(sys.argv[1:])
