#!/usr/bin/env python
"""Kill/resume drill: does a training run killed at random moments still end exactly like an uninterrupted one?

    python scripts/fault_drill.py --runs 5                  # SIGKILL only (the default)
    python scripts/fault_drill.py --runs 5 --signals KILL,TERM --max-kills 3 --workers 2

One uninterrupted reference run first (tiny CvT, tiny generated CIFAR-10 in torchvision's format, CPU, fp32), then
each drill run: start `python -m cvt_train.train ... trainer.resume=auto`, wait a random time into training, send a
signal (SIGKILL to the trainer alone or to its whole process group with the DataLoader workers, or SIGTERM to the
group as a scheduler would), restart, and again, up to --max-kills times; then let it finish. A run counts as
identical when its final last.pt and best.pt hold the reference's weights bit for bit and metrics.json has the same
top1 / top5 / loss / best_top1 / epoch. The result of `--runs 5` is in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fakedata import write_cifar10_python  # noqa: E402

METRIC_KEYS = ("top1", "top5", "loss", "best_top1", "epoch")
STARTED = "model cvt_cifar_tiny"  # the trainer logs this line once its data and model are ready
N_TRAIN, N_TEST, BATCH = 300, 100, 50


def train_args(data: Path, workers: int, epochs: int) -> list[str]:
    return [
        "model=cvt_cifar_tiny",
        "data=cifar10",
        f"data.root={data}",
        f"data.num_workers={workers}",
        f"data.batch_size={BATCH}",
        "trainer.precision=fp32",
        "trainer.progress=false",
        "optim.lr=2e-3",
        "sched.warmup_epochs=0",
        f"trainer.epochs={epochs}",
        "trainer.resume=auto",
    ]


def start(args: list[str], run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CVT_FAULT_INJECT", None)
    out = open(f"{run_dir}.out", "a")  # a file, not a pipe: killed trainers leave orphaned workers holding pipes
    return subprocess.Popen(
        [sys.executable, "-m", "cvt_train.train", *args, f"hydra.run.dir={run_dir}"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def started_count(run_dir: Path) -> int:
    log = run_dir / "train.log"
    return log.read_text().count(STARTED) if log.is_file() else 0


def wait_for_training(proc: subprocess.Popen, run_dir: Path, before: int) -> float | None:
    """Block until this process has started training; returns the time it did (None if it exited first)."""
    while started_count(run_dir) == before:
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    return time.monotonic()


def reference_run(args: list[str], run_dir: Path) -> float:
    """Run to the end; returns how long training took, from its start to the last epoch's evaluation (train.log's
    timestamps: start-up and teardown, where a kill tests nothing, are left out)."""
    code = start(args, run_dir).wait()
    if code != 0:
        raise SystemExit(f"reference run failed (exit {code}); see {run_dir}.out")
    stamps = [
        datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
        for line in (run_dir / "train.log").read_text().splitlines()
        if STARTED in line or "epoch " in line
    ]
    return (stamps[-1] - stamps[0]).total_seconds() + 0.2  # + writing the last checkpoints


def state(run_dir: Path) -> str:
    """Where a killed run stands: last.pt's epoch/step, and any temporary file a kill left mid-write."""
    last = run_dir / "last.pt"
    where = "no last.pt yet"
    if last.is_file():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)  # must always load
        where = f"last.pt epoch {ckpt['epoch']} step {ckpt['step']}"
    stray = list(run_dir.glob(".*.tmp"))
    return where + (f", {len(stray)} temporary file(s) left mid-write" if stray else "")


def epochs(args: list[str]) -> int:
    return int(next(a for a in args if a.startswith("trainer.epochs=")).split("=")[1])


def done_epochs(run_dir: Path, args: list[str]) -> float:
    """Epochs (with the fraction of the one in progress) in last.pt: where a restart continues from."""
    last = run_dir / "last.pt"
    if not last.is_file():
        return 0.0
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    return ckpt["epoch"] + ckpt["step"] / (N_TRAIN // BATCH)


def differences(run_dir: Path, reference: Path) -> list[str]:
    out = []
    for name in ("last.pt", "best.pt"):
        ours = torch.load(run_dir / name, map_location="cpu", weights_only=True)
        ref = torch.load(reference / name, map_location="cpu", weights_only=True)
        out += [f"{name}:{k}" for k, t in ref["model"].items() if not torch.equal(ours["model"][k], t)]
        if (ours["epoch"], ours["global_step"]) != (ref["epoch"], ref["global_step"]):
            out.append(f"{name}: epoch/global_step")
    ours, ref = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    out += [f"metrics.json:{k}" for k in METRIC_KEYS if ours.get(k) != ref.get(k)]
    return out


def drill(
    i: int,
    args: list[str],
    run_dir: Path,
    reference: Path,
    span: float,
    rng: random.Random,
    max_kills: int,
    signals: list[str],
) -> bool:
    kills, notes, unclean = rng.randint(1, max_kills), [], []
    for _ in range(kills):
        before = started_count(run_dir)
        proc = start(args, run_dir)
        t0 = wait_for_training(proc, run_dir, before)
        delay = rng.uniform(0.0, span * (1 - done_epochs(run_dir, args) / epochs(args)))  # within what is left
        while t0 is not None and proc.poll() is None and time.monotonic() < t0 + delay:
            time.sleep(0.01)
        if proc.poll() is not None:  # finished before the kill
            notes.append(f"finished before the kill at +{delay:.2f}s")
            break
        name = rng.choice(signals)
        group = name == "TERM" or rng.random() < 0.5  # a scheduler signals the whole group; the OOM killer one
        sig = getattr(signal, f"SIG{name}")
        os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
        code = proc.wait()
        if name == "KILL" and group is False:
            time.sleep(0.1)  # orphaned DataLoader workers notice their parent is gone and exit on their own
        notes.append(f"SIG{name} to {'group' if group else 'trainer'} at +{delay:.2f}s (exit {code}): {state(run_dir)}")
        if name != "KILL" and code != 0:  # a stop signal must end in a clean exit with last.pt written
            unclean.append(f"SIG{name} exit {code}")
    proc = start(args, run_dir)
    code = proc.wait()
    diff = unclean + (differences(run_dir, reference) if code == 0 else [f"final run exit {code}"])
    print(f"run {i}: " + "; ".join(notes))
    print(f"       -> {'IDENTICAL' if not diff else 'DIFFERENT: ' + ', '.join(diff[:5])}", flush=True)
    return not diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-kills", type=int, default=2, help="kills per run: 1..this, at random")
    ap.add_argument("--signals", default="KILL", help="comma-separated, from KILL, TERM, INT, USR1")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers (default: 0 or 2 at random per run)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = a.dir or Path(tempfile.mkdtemp(prefix="fault_drill_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = write_cifar10_python(work / "cifar", n_train=N_TRAIN, n_test=N_TEST)
        reference = work / "reference"
        span = reference_run(train_args(data, 0, a.epochs), reference)
        print(
            f"reference: {a.epochs} epochs, uninterrupted; training took {span:.2f}s after start-up; each kill "
            f"lands at a uniform random time in the part of that span a restart has left\n"
        )
        signals = [s.strip().upper() for s in a.signals.split(",")]
        same = 0
        for i in range(1, a.runs + 1):
            workers = a.workers if a.workers is not None else rng.choice([0, 2])
            print(f"[data.num_workers={workers}]", end=" ")
            same += drill(
                i, train_args(data, workers, a.epochs), work / f"run{i}", reference, span, rng, a.max_kills, signals
            )
        print(f"\n{same}/{a.runs} runs ended identical to the uninterrupted one")
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if same == a.runs else 1)


if __name__ == "__main__":
    main()
