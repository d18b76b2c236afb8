"""The GPU path, checked on a CPU (issue 11): what a collective is handed, checkpoints that move between machines
of any GPU count, no host read per optimizer step, torch.compile with no graph break and no recompile.

A host read (`.item()`, `bool(t)`, ...) stalls a GPU until its queue is empty; on CPU the same reads go through the
same ATen op, so they are counted here with cvt_train.engine.hostsync.HostReads. Per-step figures are the
difference between a run of 12 steps and one of 4 (setup, evaluation and saving are the same in both), over 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from fakedata import write_cifar10_python
from sync_probe import probe
from torch import nn

import cvt_train
from cvt_train.engine import trainer as trainer_module
from cvt_train.engine.checkpoint import restore_rng, rng_states
from cvt_train.engine.distributed import DistInfo
from cvt_train.engine.ema import WeightEma
from cvt_train.engine.trainer import Trainer, train

TESTS = Path(__file__).parent
# one loader worker: the data pipeline's reads of its own host tensors happen there, out of the count
BASE = [
    "trainer.device=cpu",
    "model=cvt_cifar_tiny",
    "data=cifar10",
    "trainer.progress=false",
    "data.num_workers=1",
    "data.batch_size=20",
    "optim.lr=1e-3",
    "sched.warmup_epochs=0",
    "trainer.epochs=1",
    "data.val_subset=40",
    "trainer.log_every=1000",
]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=300, n_test=100)


# ----------------------------------------------------------------------------------------------------------------
# 1. what collectives are handed


def test_buffer_sync_hands_every_collective_tensors_on_the_rank_device(monkeypatch):
    """NCCL takes CUDA tensors only: before each evaluation and save, every rank takes rank 0's BatchNorm
    statistics and EMA, whose `n_averaged` counter used to stay on the CPU (a crash at the end of the first epoch
    of any multi-GPU run with EMA). Model and EMA on `meta` (a non-CPU device): every broadcast tensor must be too."""
    device = torch.device("meta")
    model = cvt_train.create_model("cvt_cifar_tiny").to(device)
    trainer = Trainer.__new__(Trainer)  # only what sync_buffers reads
    trainer.dist, trainer.model = DistInfo(rank=1, world_size=2, device=device), model
    trainer.ema = WeightEma(model, 0.999, True, device)
    handed = []
    monkeypatch.setattr(torch.distributed, "broadcast", lambda t, src: handed.append((t.device, t.shape)))
    trainer.sync_buffers()
    expected = (
        len(list(model.buffers()))
        + len(list(trainer.ema.averaged.buffers()))
        + len(list(trainer.ema.averaged.parameters()))
    )
    assert len(handed) == expected and any(shape == () for _, shape in handed)  # n_averaged among them
    assert {d for d, _ in handed} == {device}


# ----------------------------------------------------------------------------------------------------------------
# 2. checkpoints move between machines of any GPU count


def pretend_gpus(monkeypatch, visible: int) -> None:
    """CUDA as a machine with `visible` GPUs would show it to the RNG code (this machine has none)."""
    states = {}

    def set_rng_state(state, device=0):
        index = torch.device(device).index if not isinstance(device, int) else device
        if index >= visible:
            raise IndexError(f"cuda:{index} is not visible")  # what torch's per-device generators list gives
        states[index] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)] * visible)


@pytest.mark.parametrize("visible", [1, 0])
def test_rng_states_of_eight_gpus_restore_where_fewer_are_visible(visible, monkeypatch):
    states = rng_states()
    assert "cuda" not in states  # not written: every batch reseeds torch, CUDA included
    states["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8  # as a checkpoint of an 8-GPU run holds
    pretend_gpus(monkeypatch, visible)
    restore_rng(states)  # raised IndexError with one GPU visible before
    assert torch.equal(torch.get_rng_state(), states["torch"])


@pytest.mark.parametrize("visible", [1, 0])
def test_checkpoint_of_eight_gpus_resumes_exactly_on_fewer(visible, tmp_path, cifar, monkeypatch):
    overrides = [
        *BASE,
        f"data.root={cifar}",
        "trainer.epochs=2",
        "trainer.precision=fp32",
        "trainer.ema.enabled=true",
        "model.stages.2.drop_path_rate=0.2",
    ]
    train(compose_train(overrides), tmp_path / "full")
    with monkeypatch.context() as m:
        m.setattr(trainer_module.StopRequest, "requested", lambda self, dist: self_stop(self))
        train(compose_train(overrides), tmp_path / "cut")
    path = tmp_path / "cut" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 7)
    ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    torch.save(ckpt, path)
    with monkeypatch.context() as m:  # GPUs pretended while the checkpoint is read and restored
        pretend_gpus(m, visible)
        resumed_trainer = Trainer(compose_train([*overrides, "trainer.resume=auto"]), tmp_path / "cut")
    assert resumed_trainer.progress.global_step == 7
    resumed_trainer.fit()
    full, resumed = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "cut"))
    for key in ("model", "ema"):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"


def self_stop(stop) -> bool:
    """A stop request after the 7th optimizer step (as if SIGTERM came then)."""
    stop.calls = getattr(stop, "calls", 0) + 1
    if stop.calls == 7:
        stop.signum = 15
    return stop.calls == 7


# ----------------------------------------------------------------------------------------------------------------
# 3. no host read per optimizer step


def per_step(run, short: int = 4, long: int = 12, **kwargs) -> tuple[float, float, dict]:
    a, b = (run(n, **kwargs) for n in (short, long))
    return (b["reads"] - a["reads"]) / (long - short), (b["collectives"] - a["collectives"]) / (long - short), b


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["trainer.ema.enabled=true"],
        ["trainer.ema.enabled=true", "trainer.grad_clip=1.0", "trainer.accum_steps=2", "optim=sgd"],
    ],
    ids=["plain", "ema", "ema-clip-accum-sgd"],
)
def test_no_host_read_per_optimizer_step(extra, tmp_path, cifar):
    def run(steps):
        return probe(
            [*BASE, f"data.root={cifar}", f"trainer.max_steps_per_epoch={steps}", *extra], tmp_path / f"{steps}" / "run"
        )

    reads, _, longer = per_step(run)
    assert reads == 0, longer["where"]


def test_no_host_read_between_log_points_counts_the_log_points(tmp_path, cifar):
    """With trainer.log_every=2 the loop reads the device once per log point: half a read per step."""

    def run(steps):
        return probe(
            [*BASE, f"data.root={cifar}", f"trainer.max_steps_per_epoch={steps}", "trainer.log_every=2"],
            tmp_path / f"{steps}" / "run",
        )

    reads, _, _ = per_step(run)
    assert reads == 0.5


def test_two_ranks_no_host_read_and_no_collective_per_step(tmp_path, cifar):
    """Two gloo ranks: between log points a step reads nothing back and calls no collective of the trainer's
    (DDP's own gradient all-reduce aside): a stop signal is shared at log points."""

    def run(steps, port):
        out = tmp_path / f"{steps}" / "probe.json"
        out.parent.mkdir(parents=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            str(TESTS / "sync_probe.py"),
            str(out),
            *BASE,
            f"data.root={cifar}",
            f"trainer.max_steps_per_epoch={steps}",
            "trainer.ema.enabled=true",
        ]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]

    short, long = run(2, 29741), run(6, 29742)
    for rank in (0, 1):
        assert long[rank]["global_step"] == 6
        assert (long[rank]["reads"] - short[rank]["reads"]) / 4 == 0, long[rank]["where"]
        assert (long[rank]["collectives"] - short[rank]["collectives"]) / 4 == 0


def test_diverged_run_stops_at_the_next_log_point_naming_the_step(tmp_path, cifar, monkeypatch):
    """Non-finite losses are counted on the device; the run stops at the first read after the limit is reached
    (here the end of the epoch) and names the step where it was reached."""
    calls = {"n": 0}
    real = nn.CrossEntropyLoss.forward

    def nan_from_third(self, logits, targets):
        calls["n"] += 1
        return real(self, logits, targets) * (float("nan") if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", nan_from_third)
    trainer = Trainer(
        compose_train([*BASE, f"data.root={cifar}", "trainer.max_steps_per_epoch=10", "trainer.max_nonfinite=4"]),
        tmp_path / "run",
    )
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(cvt_train.UserError, match=r"non-finite loss for 4 consecutive steps \(epoch 1, step 6\)"):
        trainer.fit()
    assert trainer.progress.global_step == 10 and not (tmp_path / "run" / "last.pt").exists()
    # the skipped steps left the weights where the last finite step put them (not NaN)
    assert all(
        torch.isfinite(v).all()
        for k, v in trainer.model.state_dict().items()
        if v.is_floating_point() and "running" not in k
    )
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in weights.items())


# ----------------------------------------------------------------------------------------------------------------
# 4. torch.compile: no graph break, no recompile after warm-up


@pytest.mark.slow
def test_compiled_training_and_evaluation_compile_once(tmp_path, cifar):
    """Two epochs with a val set whose last batch is smaller (45 = 20 + 20 + 5), EMA on: one graph for training,
    one for evaluation (the EMA's copy of the model shares it), none added in the second epoch."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = []
    real = trainer_module.Trainer.evaluate

    def evaluate(self, seen, seconds):
        out = real(self, seen, seconds)
        graphs.append(counters["stats"]["unique_graphs"])
        return out

    trainer_module.Trainer.evaluate = evaluate
    try:
        train(
            compose_train(
                [
                    *BASE,
                    f"data.root={cifar}",
                    "trainer.compile=true",
                    "trainer.epochs=2",
                    "trainer.max_steps_per_epoch=3",
                    "data.val_subset=45",
                    "trainer.ema.enabled=true",
                ]
            ),
            tmp_path / "run",
        )
    finally:
        trainer_module.Trainer.evaluate = real
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[0] == graphs[1], graphs  # nothing compiled in epoch 2
    assert graphs[0] <= 3, graphs  # train, eval (+ the EMA module's eval at most)
