"""cvt-train on a real SLURM cluster: the one-node cluster of scripts/slurm_local.sh (slurmctld, slurmd, slurmdbd on
MariaDB, munge), which .ci/run starts. Skipped, with the reason, where no cluster answers.

Sweeps go through Hydra's submitit launcher, as users run them. The `scancel` tests submit with plain `sbatch`
instead: they stop a job by hand and look at what it left, and a launcher waiting on the job adds nothing there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fakedata import write_cifar10_python

pytestmark = pytest.mark.slurm
CONF = os.environ.get("SLURM_CONF") or os.environ.get("CVT_SLURM_DIR", "/tmp/cvt-slurm") + "/slurm.conf"
TINY = [
    "model=cvt_cifar_tiny",
    "data=cifar10",
    "data.num_workers=0",
    "data.batch_size=50",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.precision=fp32",
]
EXACT = [*TINY, "trainer.threads=1"]  # the same threads in and out of SLURM: bit-exact comparisons


@pytest.fixture(scope="module")
def slurm_env() -> dict:
    """The environment that reaches the local cluster; skips where none answers."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed: run scripts/slurm_local.sh up (as root)")
    env = {**os.environ, "SLURM_CONF": CONF}
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    if state.returncode or not state.stdout.strip():
        pytest.skip(f"no SLURM cluster answers (SLURM_CONF={CONF}): run scripts/slurm_local.sh up")
    return env


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=2000, n_test=200)


def cvt_train(args: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cvt_train.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def sacct(job_ids: list[str], fields: str, env: dict) -> list[list[str]]:
    """One row of `fields` per job (allocations only, -X), as sacct prints them."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", fields, "-j", ",".join(job_ids)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [line.split("|") for line in out.splitlines() if line]  # "CANCELLED by 0": split on | alone


def job_states(job_ids: list[str], env: dict) -> dict[str, str]:
    return {job: state for job, state in sacct(job_ids, "JobID,State", env)}


def job_times(job: str, env: dict) -> tuple[str, str]:
    """(start, end) of a job as sacct prints them (ISO 8601: they compare as strings)."""
    ((start, end),) = sacct([job], "Start,End", env)
    return start, end


def submitit_jobs(sweep: Path) -> list[str]:
    """The SLURM job ids of a sweep's jobs (submitit names a folder after each, `7_0` for an array's task)."""
    names = [p.name for p in (sweep / ".submitit").iterdir() if p.name.replace("_", "").isdigit()]
    return sorted(n for n in names if "_" in n) or sorted(names)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    """The same weights bit for bit and the same metrics: `b` (interrupted, resumed) is the run `a` (uninterrupted)."""
    wa, wb = weights(a / "last.pt"), weights(b / "last.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert {k: ma[k] for k in ("top1", "top5", "loss", "best_top1", "epoch")} == {
        k: mb[k] for k in ("top1", "top5", "loss", "best_top1", "epoch")
    }


def test_sweep_runs_as_real_slurm_jobs_with_threads_from_the_allocation(slurm_env, cifar, tmp_path):
    sweep = tmp_path / "sweep"
    args = [*TINY, f"data.root={cifar}", "trainer.epochs=2", "optim.lr=1e-3,2e-3"]
    launcher = ["hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"]
    result = cvt_train(["-m", *launcher, *args, f"hydra.sweep.dir={sweep}"], tmp_path, slurm_env)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = submitit_jobs(sweep)  # a sweep is one job array: 7_0, 7_1
    assert len(jobs) == 2 and [wait_until_done(job, slurm_env) for job in jobs] == ["COMPLETED"] * 2
    summary = (sweep / "summary.md").read_text()
    assert summary.count("| ok |") == 2, summary
    assert "sacct error" not in result.stderr + result.stdout  # accounting answers: no warning per poll
    for job in ("0", "1"):  # one thread each, from the job's allocation: two jobs share two cores without thrashing
        assert "threads: 1 intra-op (SLURM_CPUS_PER_TASK=1)" in (sweep / job / "train.log").read_text()
    starts, ends = zip(*(job_times(job, slurm_env) for job in jobs))
    assert max(starts) < min(ends)  # they ran side by side (one CPU and its share of memory each)


def test_time_limit_signals_writes_last_pt_requeues_and_ends_as_an_uninterrupted_run(slurm_env, cifar, tmp_path):
    """A 2-minute SLURM limit on ~80 s of training: submitit's signal comes `signal_delay_s` before the limit (SLURM
    may send it up to a minute early), the trainer writes last.pt and hands the signal to submitit, which requeues
    the job (max_num_timeout >= 1); the requeued job resumes from last.pt (trainer.resume=auto). It may be cut more
    than once: the end must be the uninterrupted run's, bit for bit."""
    args = [*EXACT, f"data.root={cifar}", "trainer.epochs=25", "trainer.resume=auto"]
    reference = cvt_train([*args, f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path, slurm_env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    launcher = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=60",
        "hydra.launcher.max_num_timeout=5",
        "hydra.launcher.cpus_per_task=1",
    ]
    sweep = tmp_path / "sweep"
    result = cvt_train(["-m", *launcher, *args, f"hydra.sweep.dir={sweep}"], tmp_path, slurm_env, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (sweep / "0" / "train.log").read_text()
    stops = log.count("stopped by signal 12")  # SIGUSR2, submitit's
    assert stops >= 1 and log.count("resumed from") == stops, log[-3000:]
    (job,) = submitit_jobs(sweep)
    assert wait_until_done(job, slurm_env) == "COMPLETED"
    assert_same_run(tmp_path / "reference", sweep / "0")


def sbatch(command: str, run_dir: Path, env: dict, *options: str) -> str:
    """Submit `command` as a batch script (its training under `srun`, as on clusters); returns the job id."""
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir.parent / f"{run_dir.name}.sh"
    script.write_text(f"#!/bin/bash\n{command}\n")
    out = subprocess.run(
        ["sbatch", "--parsable", "-t", "10", "-o", str(run_dir.parent / f"{run_dir.name}.out"), *options, str(script)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.strip().split(";")[0]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


ACTIVE_STATES = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING")


def wait_until_done(job: str, env: dict, timeout: float = 300) -> str:
    """The job's final state, once its processes are gone (a cancelled job is CANCELLED at once, while its
    processes still finish: squeue lists it, COMPLETING, until they have) and accounting has it: slurmdbd records
    the end after squeue drops the job (CI once read RUNNING from sacct a moment after squeue had let go)."""

    def done() -> bool:
        listed = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout
        # (no row yet: slurmdbd has not heard of the job; it is still to come)
        return not listed.strip() and not job_states([job], env).get(job, "PENDING").startswith(ACTIVE_STATES)

    wait_for(done, timeout, f"job {job} to end")
    return job_states([job], env)[job].split(" ")[0]


@pytest.mark.parametrize("how", ["scancel", "scancel --signal=USR2"])
def test_scancel_leaves_a_loadable_last_pt_at_the_step_reached(how, slurm_env, cifar, tmp_path):
    """`scancel` (SIGTERM, then SIGKILL after KillWait) and `scancel --signal=USR2` (a stop request): the trainer
    stops after the step it is in, writes last.pt there and nothing half-written is left; with USR2 the job ends
    cleanly (COMPLETED), with scancel it is CANCELLED."""
    run = tmp_path / "run"
    args = " ".join([*EXACT, f"data.root={cifar}", "trainer.epochs=50", f"hydra.run.dir={run}"])
    job = sbatch(f"srun {sys.executable} -m cvt_train.train {args}", run, slurm_env, "--cpus-per-task=1")
    wait_for(lambda: (run / "last.pt").is_file(), 300, "the first last.pt")  # an epoch is done: training is on
    subprocess.run([*how.split(), job], env=slurm_env, check=True)
    assert wait_until_done(job, slurm_env) == ("COMPLETED" if "USR2" in how else "CANCELLED")
    log = (run / "train.log").read_text()
    signum = signal.SIGUSR2 if "USR2" in how else signal.SIGTERM
    assert f"stopped by signal {int(signum)} at epoch" in log, log[-2000:]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    stopped_at = log.split(f"stopped by signal {int(signum)} at epoch ")[1].split(";")[0]  # "E step S"
    assert stopped_at == f"{ckpt['epoch'] + 1} step {ckpt['step']}"
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # no temporary file left behind


def test_two_tasks_of_a_submitit_job_train_ddp_and_validate_as_one_process(slurm_env, cifar, tmp_path):
    """hydra.launcher.tasks_per_node=2: one SLURM job of two tasks, gloo; the ranks come from SLURM's variables."""
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=10", "hydra.launcher.tasks_per_node=2"]
    launcher.append("hydra.launcher.cpus_per_task=1")
    args = [*EXACT, f"data.root={cifar}", "trainer.epochs=1", f"hydra.sweep.dir={sweep}"]
    result = cvt_train(["-m", *launcher, *args], tmp_path, slurm_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_validates_as_one_process(sweep / "0", tmp_path, slurm_env)


def test_plain_srun_of_two_tasks_forms_one_process_group(slurm_env, cifar, tmp_path):
    """`srun --ntasks=2 cvt-train ...`: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from SLURM's variables, one
    run (only rank 0 writes), not two independent runs writing the same folder."""
    run = tmp_path / "run"
    args = " ".join([*EXACT, f"data.root={cifar}", "trainer.epochs=1", f"hydra.run.dir={run}"])
    job = sbatch(f"srun {sys.executable} -m cvt_train.train {args}", run, slurm_env, "--ntasks=2", "--cpus-per-task=1")
    assert wait_until_done(job, slurm_env) == "COMPLETED", (run.parent / "run.out").read_text()[-3000:]
    assert "world size 2" in (run / "train.log").read_text()
    assert_validates_as_one_process(run, tmp_path, slurm_env)


def assert_validates_as_one_process(run: Path, tmp_path: Path, env: dict) -> None:
    """The two ranks ended with the same model (the trainer's check), and the validation they reduced equals a
    single-process cvt-eval of the checkpoint."""
    log = (run / "train.log").read_text()
    assert "(identical)" in log, log[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    args = [f"ckpt={run / 'last.pt'}", "trainer.precision=fp32", "eval.progress=false"]
    evaluated = subprocess.run(
        [sys.executable, "-m", "cvt_train.eval", *args, f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    single = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (single["images"], single["top1"], single["top5"]) == (200, metrics["top1"], metrics["top5"])
    assert single["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
