"""scripts/step_overhead.py: the trainer's step against the model alone, in one process, on tiny generated data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import compose_train
from fakedata import write_cifar10_python
from test_train import FAST

from cvt_train.engine.trainer import Trainer

SCRIPT = Path(__file__).parent.parent / "scripts" / "step_overhead.py"


def load_script():
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_times_every_kind_of_step_and_runs_the_trainers_own_step(tmp_path):
    """500 images at batch 50 are 10 batches an epoch: the batch taken first and the 2 + 12 rounds of loader +
    train_step, then 12 of the loader alone, wrap into a third epoch. Every train_step is the trainer's own: its
    optimizer steps are counted."""
    script = load_script()
    root = write_cifar10_python(tmp_path / "cifar", n_train=500, n_test=100)
    overrides = [*FAST, "data=cifar10", f"data.root={root}", *script.DEFAULTS]
    trainer = Trainer(compose_train(overrides), tmp_path / "run")
    try:
        medians = script.measure(trainer, rounds=12, warmup=2)
    finally:
        trainer.close(hparams=False)
    assert list(medians) == ["model alone", "train_step", "loader + train_step", "loader"]
    assert all(seconds > 0 for seconds in medians.values())
    # train_step twice a round (alone, and after the loader), warm-up included; the model-alone steps add none
    assert trainer.progress.global_step == 2 * (2 + 12)
    report = script.report(medians, 50)
    assert f"{medians['loader + train_step'] / medians['model alone']:.3f}x" in report


def test_main_takes_cvt_train_overrides(tmp_path, capsys):
    root = write_cifar10_python(tmp_path / "cifar", n_train=200, n_test=50)
    medians = load_script().main(["--rounds", "2", "--warmup", "1", *FAST, "data=cifar10", f"data.root={root}"])
    out = capsys.readouterr().out
    assert all(name in out for name in medians)
    assert out.count("x\n") == 3  # the ratios to model alone (not of the loader alone)
