"""Entry points before and around training: overrides checked before Hydra starts, output dirs, signals handed on
to a cluster's handler (submitit), SLURM's variables, the resolved config in the run dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_train
from fakedata import write_cifar10_python

from cvt_train.engine import distributed
from cvt_train.engine import trainer as trainer_module

# trainer.device=cpu: bit-exact comparisons (resume, ranks, eval) hold on CPU; on CUDA, cuDNN's algorithm choice
# and atomic adds change the last bits (README, Reproducibility)
BASE = [
    "trainer.device=cpu",
    "model=cvt_cifar_tiny",
    "data=cifar10",
    "trainer.progress=false",
    "trainer.precision=fp32",
    "data.batch_size=50",
    "optim.lr=2e-3",
    "sched.warmup_epochs=0",
    "trainer.epochs=2",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=300, n_test=100)


def cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CVT_DEBUG")}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize(
    "module, args, expected",
    [
        ("cvt_train.train", ["trainer.epoch=3"], "trainer.epoch: unknown key; known keys: accum_steps, channels_last,"),
        ("cvt_train.train", ["data=cifar11"], "data=cifar11: no such option; choose one of cifar10, cifar100, digits"),
        (
            "cvt_train.train",
            ["-m", "model=cvt13,cvt99"],
            "model=cvt99: no such option; choose one of cvt13,",
        ),  # a later value
        (
            "cvt_train.train",
            ["-m", "trainer.epochs=1,abc"],
            "trainer.epochs='abc': expected an integer >= 1",
        ),  # a later value
        ("cvt_train.train", ["model.stages.0.dim=8"], "model.stages.0.dim: unknown key; known keys: attn_drop_rate,"),
        ("cvt_train.train", ["model=3"], "model=3: Config group override must be a string or a list"),
        ("cvt_train.train", ["trainer.epochs=[1"], "trainer.epochs=[1: no viable alternative at input '[1'"),
        ("cvt_train.eval", ["ckpt=x.pt", "eval.splitt=val"], "eval.splitt: unknown key; known keys: batch_size, ema,"),
        ("cvt_train.bench", ["bench.stepz=3"], "bench.stepz: unknown key; known keys: batch_size, channels_last,"),
    ],
)
def test_bad_override_is_one_line_before_anything_runs(module, args, expected, tmp_path):
    result = cli(module, args, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no run dir, no log


def test_run_dir_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = cli("cvt_train.train", ["experiment=quickstart", f"hydra.run.dir={blocker}/run"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: hydra.run.dir={blocker}/run: {blocker} is a file, not a folder; set "
        "hydra.run.dir to a folder you can write"
    )


def signal_after_step(monkeypatch, signum: int) -> None:
    """The trainer sends itself `signum` right after the third step of the first epoch."""
    real_step = trainer_module.Trainer.train_step

    def step_then_signal(self, images, targets, epoch, step):
        out = real_step(self, images, targets, epoch, step)
        if epoch == 0 and step == 2:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step_then_signal)


def test_signal_is_handed_on_after_last_pt(cifar, tmp_path, monkeypatch):
    """submitit (hydra/launcher=submitit_slurm) sends SIGUSR2 before a time limit and requeues the job from its own
    handler: the trainer must first finish the step and write last.pt, then call that handler."""
    calls = []

    def cluster_handler(signum, frame):  # stands for submitit's requeue-and-exit
        calls.append((signum, (tmp_path / "run" / "last.pt").is_file()))

    previous = signal.signal(signal.SIGUSR2, cluster_handler)
    signal_after_step(monkeypatch, signal.SIGUSR2)
    try:
        trainer_module.train(compose_train([*BASE, f"data.root={cifar}"]), tmp_path / "run")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [(signal.SIGUSR2, True)]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 3)
    assert signal.getsignal(signal.SIGUSR2) is previous  # restored after the run


def test_run_dir_holds_the_resolved_config(cifar, tmp_path):
    trainer_module.train(compose_train([*BASE, f"data.root={cifar}", "trainer.epochs=1"]), tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    assert "${" not in text
    assert yaml.safe_load(text)["model"]["num_classes"] == 10  # ${data.num_classes} in the model config


def test_submitit_tasks_become_torchrun_ranks(monkeypatch):
    """A submitit job of several tasks: torchrun's variables come from submitit's helper, GPUs left visible."""

    class FakeEnvironment:  # what submitit derives from SLURM's variables
        master_addr, master_port, rank, world_size, local_rank = "node17", 29517, 9, 16, 1

    helpers = types.ModuleType("submitit.helpers")
    helpers.TorchDistributedEnvironment = FakeEnvironment
    monkeypatch.setitem(sys.modules, "submitit", types.ModuleType("submitit"))
    monkeypatch.setitem(sys.modules, "submitit.helpers", helpers)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.setenv(key, "")  # recorded, so that the test's exports are undone afterwards
        monkeypatch.delenv(key)
    monkeypatch.setenv("MASTER_PORT", "29511")  # set by the user (hydra.launcher.setup): kept
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed.export_submitit_env()  # one task: nothing to set up
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed.export_submitit_env()
    assert [os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")] == [
        "node17",
        "29511",
        "9",
        "16",
        "1",
    ]
    assert not distributed.export_submitit_env()  # RANK is set now (as under torchrun): left alone


@pytest.mark.parametrize(
    "module, app", [("cvt_train.train", "cvt-train"), ("cvt_train.eval", "cvt-eval"), ("cvt_train.bench", "cvt-bench")]
)
def test_help_names_the_app_and_lists_the_groups(module, app, tmp_path):
    result = cli(module, ["--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"{app}: ") and "== Configuration groups ==" in result.stdout
    assert "model: cvt13, cvt13_cifar, cvt13_zoo, cvt21" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_prints_the_composed_config_and_runs_nothing(tmp_path):
    result = cli("cvt_train.train", ["model=cvt21", "model.stages.0.patch_stride=2", "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["name"] == "cvt21" and cfg["model"]["stages"][0]["patch_stride"] == 2
    assert [len(cfg["model"]["stages"]), cfg["model"]["stages"][2]["depth"]] == [3, 16]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "optim.lr=interval(1e-4,3e-3)"],  # a sweeper plugin's search space: only Hydra can list it
        ["-m", "optim.lr=glob(*)"],
        ["+trainer.new_key=1"],
        ["-m", "trainer.seed=range(0,3)"],  # (~aug.hflip: the schema
        # keeps every key, so deleting one is refused now, in one line)
        ["optim.betas=[0.9,0.99]", "data.root=/tmp/with space"],
        ["--cfg", "job", "trainer.nope=1"],  # flags: Hydra's
    ],
)
def test_valid_or_hydra_only_overrides_pass_the_early_check(args, monkeypatch):
    from cvt_train import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["cvt-train", *args])
    cli_module.check_overrides("train")  # no SystemExit


def test_sigterm_left_to_submitit_which_acts_on_sigusr2(cifar, tmp_path, monkeypatch):
    """Inside a submitit job SIGTERM is submitit's to ignore (it requeues on SIGUSR2): the run goes on."""
    calls = []

    def bypass(signum, frame):
        calls.append(signum)

    bypass.__module__ = "submitit.core.job_environment"
    previous = signal.signal(signal.SIGTERM, bypass)
    signal_after_step(monkeypatch, signal.SIGTERM)
    try:
        trainer = trainer_module.Trainer(compose_train([*BASE, f"data.root={cifar}"]), tmp_path / "run")
        trainer.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == [signal.SIGTERM] and trainer.stop_signal is None
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2  # ran to the end


def test_stop_signal_ends_the_whole_sweep(cifar, tmp_path):
    """In a -m sweep a stop signal ends the sweep, not just the job in progress (whose last.pt is written)."""
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CVT_DEBUG")}
    out = open(tmp_path / "out.txt", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cvt_train.train",
            "-m",
            *BASE,
            f"data.root={cifar}",
            "trainer.epochs=20",
            "trainer.seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**env, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    log = sweep / "0" / "train.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "model cvt_cifar_tiny" in log.read_text()):  # logged just before training
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=120)
    text = (tmp_path / "out.txt").read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "sweep stopped by signal 15" in text and f"hydra.sweep.dir={sweep} trainer.resume=auto" in text
    assert (sweep / "0" / "last.pt").is_file() and not (sweep / "1").exists()
    assert (sweep / "summary.md").is_file()  # the jobs so far


def test_stop_during_the_last_evaluation_is_not_lost(cifar, tmp_path, monkeypatch):
    """The run is complete then, but a sweep must still stop: the trainer reports the signal."""
    real = trainer_module.run_evaluation

    def evaluate_then_signal(*args, **kwargs):
        metrics = real(*args, **kwargs)
        if args[-1] == 2:  # the evaluation after the last epoch
            os.kill(os.getpid(), signal.SIGUSR1)
        return metrics

    monkeypatch.setattr(trainer_module, "run_evaluation", evaluate_then_signal)
    trainer = trainer_module.Trainer(compose_train([*BASE, f"data.root={cifar}"]), tmp_path / "run")
    trainer.fit()
    assert trainer.stop_signal == signal.SIGUSR1
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2


def _rank_main(rank: int, port: int, results) -> None:
    """One of two gloo ranks: rank 0's file write fails; rank 1 must stop too, not wait in its next collective."""
    import torch.distributed as tdist

    from cvt_train.engine.distributed import DistInfo
    from cvt_train.errors import UserError

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    trainer = types.SimpleNamespace(dist=DistInfo(rank, 2, rank, torch.device("cpu")))

    def write() -> None:
        raise UserError("RUN/metrics.json: could not write (No space left on device)")

    try:
        distributed.on_main(write, trainer.dist)
        results.put((rank, "no error"))
    except UserError as e:
        results.put((rank, str(e)))
    finally:
        tdist.destroy_process_group()


def test_a_rank_0_failure_stops_every_rank():
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = dict(results.get(timeout=5) for _ in procs)
    assert got[0] == "RUN/metrics.json: could not write (No space left on device)"
    assert got[1].startswith("rank 0 stopped with an error")
