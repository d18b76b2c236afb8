"""Faults a long training run meets, and bad input, checked end to end (issue 5; docs/reliability.md lists them).

- SIGKILL during an epoch, during evaluation and during a checkpoint write, then `trainer.resume=auto`: the final
  weights and metrics equal an uninterrupted run. Exact moments come from the test hook CVT_FAULT_INJECT
  (cvt_train/engine/checkpoint.py): the training process SIGKILLs itself at a named point.
- SIGTERM sent to the whole process group (as SLURM does, DataLoader workers included): clean exit, resume.
- Hostile, truncated, empty and foreign checkpoint files; a stored config that tries to run something.
- Bad overrides: one line naming the key, non-zero exit, nothing written.
- Full disk, read-only output dir, divergence (NaN), fp16 loss scaling.

Training runs are real subprocesses (`python -m cvt_train.train`) where the process matters (kills, signals,
exit codes); the entry points are called in-process where only the message matters (much faster).
Data faults (missing roots, layouts, corrupt images, hostile CIFAR pickles) are tested in tests/test_data.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from fakedata import write_cifar10_python

from cvt_train import eval as eval_module
from cvt_train import schema as schema_module
from cvt_train import train as train_module
from cvt_train.engine import checkpoint as checkpoint_module
from cvt_train.engine import trainer as trainer_module
from cvt_train.errors import UserError

# 300 train / 100 test images, batch 50: 6 steps per epoch, 3 epochs.
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
    "trainer.epochs=3",
]
METRIC_KEYS = ("top1", "top5", "loss", "best_top1", "epoch")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for _key in ("HYDRA_FULL_ERROR", "CVT_DEBUG", "CVT_FAULT_INJECT"):
    ENV.pop(_key, None)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=300, n_test=100)


def overrides(cifar: Path, workers: int = 0, *extra: str) -> list[str]:
    return [*BASE, f"data.root={cifar}", f"data.num_workers={workers}", *extra]


def start_training(args: list[str], run_dir: Path, fault: str | None = None) -> subprocess.Popen:
    """`python -m cvt_train.train ARGS hydra.run.dir=RUN_DIR` in its own process group; output to RUN_DIR.out.

    Output goes to a file, not a pipe: a SIGKILLed trainer's orphaned DataLoader workers would hold a pipe open.
    """
    env = dict(ENV, CVT_FAULT_INJECT=f"kill_at={fault}") if fault else ENV
    out = open(f"{run_dir}.out", "a")
    return subprocess.Popen(
        [sys.executable, "-m", "cvt_train.train", *args, f"hydra.run.dir={run_dir}"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def train_cli(args: list[str], run_dir: Path, fault: str | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run the trainer to its end; returns (exit code, this run's output)."""
    before = Path(f"{run_dir}.out").read_text() if Path(f"{run_dir}.out").exists() else ""
    proc = start_training(args, run_dir, fault)
    code = proc.wait(timeout=timeout)
    return code, Path(f"{run_dir}.out").read_text()[len(before) :]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(run: Path, reference: Path) -> None:
    """Final weights (last.pt, best.pt) and metrics.json equal the uninterrupted reference run's."""
    for name in ("last.pt", "best.pt"):
        ours, ref = load(run / name), load(reference / name)
        assert (ours["epoch"], ours["step"], ours["global_step"]) == (ref["epoch"], ref["step"], ref["global_step"])
        assert ours["model"].keys() == ref["model"].keys()
        for key, tensor in ref["model"].items():
            assert torch.equal(ours["model"][key], tensor), f"{name}: {key} differs from the uninterrupted run"
    ours, ref = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert {k: ours[k] for k in METRIC_KEYS} == {k: ref[k] for k in METRIC_KEYS}
    assert not list(run.glob(".*.tmp")), "a stale temporary checkpoint was left behind"


@pytest.fixture(scope="module")
def reference(cifar, tmp_path_factory) -> Path:
    """The uninterrupted run every kill/resume run must end identical to (data.num_workers does not change the
    batches, so one reference serves runs with and without workers)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    code, out = train_cli(overrides(cifar), run)
    assert code == 0, out[-3000:]
    mask = os.umask(0)
    os.umask(mask)
    assert (run / "last.pt").stat().st_mode & 0o777 == 0o666 & ~mask  # as torch.save makes files, not mkstemp's 0600
    return run


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL at exact moments, then trainer.resume=auto


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_during_epoch_and_checkpoint_writes_then_resume(cifar, reference, tmp_path, workers):
    """Three kills in one run: mid-epoch 2, inside the write of best.pt, inside the final write of last.pt."""
    run, args = tmp_path / "run", overrides(cifar, workers)
    resume = [*args, "trainer.resume=auto"]

    code, out = train_cli(args, run, fault="step:8")  # epoch 2, step 2 (6 steps per epoch)
    assert code == -signal.SIGKILL, out[-3000:]
    assert load(run / "last.pt")["epoch"] == 1  # the epoch in progress is lost, nothing more

    # this process restarts at epoch 2; its first best.pt write is epoch 2's (on this data top-1 goes 65% -> 87%)
    code, out = train_cli(resume, run, fault="save:best.pt:1")
    assert "resumed from" in out and "at epoch 2 step 0" in out, out[-3000:]  # epochs counted from 1, as in logs
    assert code == -signal.SIGKILL, out[-3000:]
    assert list(run.glob(".best.pt.*.tmp")), "the kill should have left the temporary file of best.pt"
    assert load(run / "last.pt")["epoch"] == 1 and load(run / "best.pt")["epoch"] == 1  # both still load

    code, out = train_cli(resume, run, fault="save:last.pt:2")  # epoch 3's last.pt, the very last write
    assert code == -signal.SIGKILL, out[-3000:]
    assert "removed" in out and ".best.pt." in out  # the stale temporary file was cleaned up
    assert load(run / "last.pt")["epoch"] == 2

    code, out = train_cli(resume, run)
    assert code == 0, out[-3000:]
    assert_same_run(run, reference)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_during_evaluation_then_resume(cifar, reference, tmp_path, workers):
    run, args = tmp_path / "run", overrides(cifar, workers)
    code, out = train_cli(args, run, fault="eval:2")
    assert code == -signal.SIGKILL, out[-3000:]
    assert load(run / "last.pt")["epoch"] == 1
    code, out = train_cli([*args, "trainer.resume=auto"], run)
    assert code == 0, out[-3000:]
    assert_same_run(run, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["TERM", "INT", "USR1"])
def test_stop_signal_to_process_group_checkpoints_and_resumes(cifar, reference, tmp_path, sig):
    """A stop signal to the trainer and its DataLoader workers at once (SIGTERM: SLURM preemption, scancel; SIGINT:
    Ctrl-C in a terminal; SIGUSR1: sbatch --signal): the current step finishes, last.pt is written with its step,
    exit code 0, and the resumed run ends identical."""
    run, args = tmp_path / "run", overrides(cifar, 2)
    proc = start_training(args, run)
    log = run / "train.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "model cvt_cifar_tiny" in log.read_text()):  # logged just before training starts
        assert proc.poll() is None and time.monotonic() < deadline, Path(f"{run}.out").read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 1 (an epoch takes about a second)
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=120)
    out = Path(f"{run}.out").read_text()
    assert code == 0, out[-3000:]
    assert f"stopped by signal {int(sig)}" in out and "trainer.resume=auto" in out and str(run) in out, out[-3000:]
    cut = load(run / "last.pt")
    assert cut["step"] > 0 or cut["epoch"] < 3, "the signal came too late to test anything"
    assert f"at epoch {cut['epoch'] + 1} step {cut['step']};" in out  # the message names where it stopped

    code, out = train_cli([*args, "trainer.resume=auto"], run)
    assert code == 0, out[-3000:]
    assert f"at epoch {cut['epoch'] + 1} step {cut['step']}" in out  # continues at the step it stopped at
    assert_same_run(run, reference)


def test_resume_from_every_epoch_boundary_with_accumulation(cifar, tmp_path, monkeypatch):
    """What a SIGKILL anywhere reduces to: a restart from the last epoch-boundary last.pt. With gradient
    accumulation that does not divide the epoch (6 batches, accum 4) a partial accumulation must not leak into
    the next epoch, or a restarted run would differ."""
    args = overrides(cifar, 0, "trainer.accum_steps=4", "trainer.epochs=2")
    saved = []
    real_save = trainer_module.save_atomic

    def keep_copies(obj, path):
        real_save(obj, path)
        if Path(path).name == "last.pt":
            copy = tmp_path / f"epoch{obj['epoch']}_step{obj['step']}.pt"
            copy.write_bytes(Path(path).read_bytes())
            saved.append(copy)

    monkeypatch.setattr(trainer_module, "save_atomic", keep_copies)
    trainer_module.train(compose_train(args), tmp_path / "full")
    monkeypatch.undo()
    assert [p.name for p in saved] == ["epoch1_step0.pt", "epoch2_step0.pt"]
    trainer_module.train(compose_train([*args, f"trainer.resume={saved[0]}"]), tmp_path / "resumed")
    full, resumed = load(tmp_path / "full" / "last.pt"), load(tmp_path / "resumed" / "last.pt")
    assert full["global_step"] == resumed["global_step"] == 2  # one optimizer step per epoch
    for key, tensor in full["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key


# ----------------------------------------------------------------------------------------------------------------
# In-process entry points: the user-facing line of `cvt-train` / `cvt-eval` without starting a Python each time


def run_entry(module, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Call a Hydra entry point (cvt_train.train.main / cvt_train.eval.main) as the console script would;
    returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *args])
    for key in ("HYDRA_FULL_ERROR", "CVT_DEBUG", "CVT_FAULT_INJECT"):
        monkeypatch.delenv(key, raising=False)
    code = 0
    try:
        module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *expected: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# Hostile, broken and foreign checkpoint files


class MakesFile:
    """Unpickling this runs os.system("touch MARKER")."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_hostile(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A torch.save zip and a plain pickle whose loading would create MARKER; returns (zip, pickle, marker)."""
    marker = tmp_path / "marker-created-by-unpickling"
    zipped, legacy = tmp_path / "hostile.pt", tmp_path / "hostile_legacy.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}, "x": MakesFile(marker)}, zipped)
    legacy.write_bytes(pickle.dumps({"model": MakesFile(marker)}, protocol=2))
    pickle.loads(legacy.read_bytes())  # the files work: plain unpickling does create the marker
    assert marker.exists()
    marker.unlink()
    return zipped, legacy, marker


def test_hostile_pickle_refused_and_runs_nothing(cifar, tmp_path, monkeypatch, capsys):
    zipped, legacy, marker = write_hostile(tmp_path)
    # the real console script, in its own process
    proc = subprocess.run(
        [sys.executable, "-m", "cvt_train.eval", f"ckpt={zipped}", f"hydra.run.dir={tmp_path / 'e'}"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stderr, str(zipped), "refused", "GLOBAL posix.system")
    # both files through both entry points (in-process: the same code path, much faster)
    for path in (zipped, legacy):
        code, err = run_entry(eval_module, [f"ckpt={path}", f"hydra.run.dir={tmp_path / 'e2'}"], monkeypatch, capsys)
        assert_one_line_error(code, err, str(path), "refused")
        code, err = run_entry(
            train_module,
            [*overrides(cifar), f"trainer.resume={path}", f"hydra.run.dir={tmp_path / 't'}"],
            monkeypatch,
            capsys,
        )
        assert_one_line_error(code, err, str(path), "refused")
    assert not marker.exists() and not (tmp_path / "t" / "last.pt").exists()


# Stored strings with 0 to 3 backslashes before `${` (an even number used to leave the interpolation live after
# escaping), stray backslashes elsewhere, and text that only looks like an interpolation.
BACKSLASHED = [
    "${oc.env:CVT_TEST_SECRET}",
    "\\${oc.env:CVT_TEST_SECRET}",
    "\\\\${cvt_test_touch:2}",
    "\\\\\\${cvt_test_touch:3}",
    "a\\b\\${cvt_test_touch:4}\\",
    "\\$\\{x}\\",
    "$${cvt_test_touch:5}",
    "\\${a}\\\\${oc.env:CVT_TEST_SECRET}${b}",
    "${unclosed",
    "x\\\\",
    "\\",
]


def register_touch_resolver(tmp_path: Path, monkeypatch) -> Path:
    """A resolver that creates MARKER when called, and CVT_TEST_SECRET in the environment; returns MARKER."""
    from omegaconf import OmegaConf

    marker = tmp_path / "resolver-was-called"
    OmegaConf.register_new_resolver("cvt_test_touch", lambda *_: marker.touch() or "x", replace=True)
    monkeypatch.setenv("CVT_TEST_SECRET", "leaked")
    return marker


@pytest.mark.parametrize("text", BACKSLASHED)
def test_stored_string_reads_back_exactly(text, tmp_path, monkeypatch):
    """as_plain_data against OmegaConf's own grammar: each string, alone, in a list and copied into another
    config (as eval_config does), reads back as exactly the stored text, and no resolver runs."""
    from omegaconf import OmegaConf

    marker = register_touch_resolver(tmp_path, monkeypatch)
    cfg = OmegaConf.create(schema_module.as_plain_data({"v": text, "l": [text, {"v": text}]}))
    copy = OmegaConf.create({"g": cfg})
    assert [cfg.v, cfg.l[0], cfg.l[1].v, copy.g.v] == [text] * 4
    assert OmegaConf.to_container(copy, resolve=True) == {"g": {"v": text, "l": [text, {"v": text}]}}
    assert not marker.exists()


def test_stored_string_left_live_is_refused(monkeypatch):
    """Defence in depth: were the escaping ever wrong (here: switched off), OmegaConf's parser still finds the live
    interpolation and the checkpoint is refused instead of resolved."""
    monkeypatch.setattr(schema_module, "escape_interpolations", lambda text: text)
    with pytest.raises(UserError, match=r"could not be made inert"):
        schema_module.as_plain_data({"name": "\\\\${oc.env:CVT_TEST_SECRET}"})
    assert schema_module.as_plain_data({"name": "no interpolation \\"}) == {"name": "no interpolation \\"}


def test_stored_config_is_data_never_evaluated(cifar, reference, tmp_path, monkeypatch, capsys):
    """A checkpoint whose config holds `_target_`, `${oc.env:...}` and calls of a registered resolver, with 0 to 3
    backslashes before `${`: cvt-eval and load_model use it with none of them instantiated or resolved, every value
    reads back as the stored text, and trainer.resume reads it as plain data too."""
    import cvt_train.data

    marker = register_touch_resolver(tmp_path, monkeypatch)
    ckpt = load(reference / "last.pt")
    name = "\\${oc.env:CVT_TEST_SECRET}"  # before the fix: "\\leaked"
    ckpt["config"]["model"]["name"] = name
    notes = {f"note{i}": text for i, text in enumerate(BACKSLASHED)}
    ckpt["config"]["data"].update(notes)  # the data module reads every data key
    ckpt["config"]["data"]["_target_"] = "os.system"
    ckpt["config"]["data"]["_args_"] = [f"touch {marker}"]
    ckpt["config"]["_target_"] = "os.system"
    torch.save(ckpt, tmp_path / "crafted.pt")

    seen = {}
    real_build_data = cvt_train.data.build_data

    def build_data(cfg, *args, **kwargs):  # what the data module is given
        seen.update({key: cfg.data[key] for key in notes})
        return real_build_data(cfg, *args, **kwargs)

    monkeypatch.setattr(cvt_train.data, "build_data", build_data)
    code, err = run_entry(
        eval_module,
        [
            f"ckpt={tmp_path / 'crafted.pt'}",
            "eval.progress=false",
            "trainer.precision=fp32",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["model"] == name  # the text, not the environment variable
    assert seen == notes
    assert result["top1"] == json.loads((reference / "metrics.json").read_text())["top1"]
    assert eval_module.load_model(tmp_path / "crafted.pt").cfg.name == name
    assert not marker.exists()

    # trainer.resume: the stored config is only read (as a plain dict) to name what differs from this run
    code, err = run_entry(
        train_module,
        [
            *overrides(cifar),
            "model.stages.2.depth=1",
            f"trainer.resume={tmp_path / 'crafted.pt'}",
            f"hydra.run.dir={tmp_path / 'resumed'}",
        ],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, err, "does not fit this run", f"model.name={name!r} (now 'cvt_cifar_tiny')")
    assert "leaked" not in err and not marker.exists()


def broken_files(reference: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one-line error must say)."""
    from torchvision.io import write_png

    folder.mkdir(parents=True, exist_ok=True)
    data = (reference / "last.pt").read_bytes()
    (folder / "half.pt").write_bytes(data[: len(data) // 2])
    (folder / "empty.pt").write_bytes(b"")
    (folder / "notes.pt").write_text("these are not weights\n")
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(folder / "image.pt"))
    return {
        "truncated": (folder / "half.pt", "truncated or corrupt"),
        "empty": (folder / "empty.pt", "empty"),
        "text": (folder / "notes.pt", "not a PyTorch checkpoint"),
        "png": (folder / "image.pt", "not a PyTorch checkpoint (a PNG image)"),
        "missing": (folder / "missing.pt", "not found"),
    }


def test_broken_checkpoint_files_get_one_line(cifar, reference, tmp_path, monkeypatch, capsys):
    for name, (path, expected) in broken_files(reference, tmp_path / "files").items():
        code, err = run_entry(
            eval_module, [f"ckpt={path}", f"hydra.run.dir={tmp_path / 'e' / name}"], monkeypatch, capsys
        )
        assert_one_line_error(code, err, str(path), expected)
        if name == "missing":  # trainer.resume checks the path before anything else, naming the key
            expected = "trainer.resume"
        code, err = run_entry(
            train_module,
            [*overrides(cifar), f"trainer.resume={path}", f"hydra.run.dir={tmp_path / 't' / name}"],
            monkeypatch,
            capsys,
        )
        assert_one_line_error(code, err, str(path), expected)
        assert not (tmp_path / "t" / name / "last.pt").exists()


def test_truncated_last_pt_with_resume_auto(cifar, reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = (reference / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    code, err = run_entry(
        train_module, [*overrides(cifar), "trainer.resume=auto", f"hydra.run.dir={run}"], monkeypatch, capsys
    )
    assert_one_line_error(code, err, str(run / "last.pt"), "truncated or corrupt")


@pytest.mark.parametrize(
    "change,named",
    [
        ("sched.warmup_epochs=2", "sched.warmup_epochs=0 (now 2)"),
        ("model.stages.2.depth=1", "model.stages.2.depth=2 (now 1)"),
    ],
)
def test_resume_with_other_overrides_names_them(change, named, cifar, reference, tmp_path, monkeypatch, capsys):
    code, err = run_entry(
        train_module,
        [*overrides(cifar), change, f"trainer.resume={reference / 'last.pt'}", f"hydra.run.dir={tmp_path / 'run'}"],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(
        code,
        err,
        str(reference / "last.pt"),
        "does not fit this run",
        named,
        "resume with the overrides it was trained with",
    )


def test_debug_flag_shows_the_traceback(cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sys,
        "argv",
        ["cvt-train", *overrides(cifar), f"trainer.resume={tmp_path / 'nope.pt'}", f"hydra.run.dir={tmp_path / 'run'}"],
    )
    monkeypatch.setenv("CVT_DEBUG", "1")
    with pytest.raises(SystemExit):
        train_module.main()
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError: trainer.resume" in err


# ----------------------------------------------------------------------------------------------------------------
# Bad overrides: one line naming the key, before any data is read; nothing written


@pytest.mark.parametrize(
    "args,expected",
    [
        (["trainer.epochs=abc"], "trainer.epochs='abc': expected an integer >= 1"),
        (["data.batch_size=0"], "data.batch_size=0: expected an integer >= 1"),
        (["optim.lr=fast"], "optim.lr='fast': expected a number >= 0 or null"),
        (["trainer.progress=maybe"], "trainer.progress='maybe': expected true or false"),
        (["trainer.device=gpu"], "trainer.device='gpu'"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["model.num_classes=100"], "model.num_classes=100 does not match data.num_classes=10"),
        (["model.stages.0.embed=patch", "model.stages.0.patch_stride=64"], "model.stages.0.patch_stride"),
        (["model.stages.1.num_heads=3"], "model.stages.1.num_heads"),
        (["trainer.resume=/no/such/last.pt"], "trainer.resume: /no/such/last.pt does not exist"),
        (["data=folder"], "data.num_classes is not set; set data.num_classes="),  # `???` in data/folder.yaml
        # before: ValueError / TypeError tracebacks, silently accepted values, or an error only after the data was read
        (["data.val_split=abc"], "data.val_split='abc': expected a number in [0, 1) or null (0 validates on the"),
        (["data.val_split=1"], "data.val_split=1: expected a number in [0, 1)"),
        (["optim.betas=abc"], "optim.betas='abc': expected two numbers in [0, 1), e.g. optim.betas=[0.9,0.999]"),
        (["optim.betas=[0.9]"], "optim.betas=[0.9]: expected two numbers in [0, 1)"),
        (["optim=sgd", "optim.momentum=abc"], "optim.momentum='abc': expected a number >= 0"),
        (["optim=sgd", "optim.momentum=0"], "optim.nesterov=true needs optim.momentum > 0"),
        (["optim.lr=1e-3", "sched=linear", "sched.min_lr=0.01"], "sched.min_lr=0.01 is above the peak rate 0.001"),
        (["trainer.profile=maybe"], "trainer.profile='maybe': expected true or false"),
        (["data.skip_corrupt=maybe"], "data.skip_corrupt='maybe': expected true or false"),
        (["trainer.ema.decay=5"], "trainer.ema.decay=5: expected a number in [0, 1) (e.g. 0.9998"),
        (
            ["sched.name=foo"],
            "sched.name='foo': unknown schedule; choose one of cosine, linear, constant, multistep (e.g. sched=cosine)",
        ),
        (["optim.name=bar"], "optim.name='bar': unknown optimizer; choose one of adamw, sgd (e.g. optim=adamw)"),
    ],
)
def test_bad_override_one_line_naming_the_key(args, expected, tmp_path, monkeypatch, capsys):
    # data.root does not exist: an error about it would mean data was read before the config was checked
    base = [a for a in BASE if not (a.startswith("data=") and any(x.startswith("data=") for x in args))]
    run = tmp_path / "run"
    code, err = run_entry(
        train_module, [*base, f"data.root={tmp_path / 'no-data'}", *args, f"hydra.run.dir={run}"], monkeypatch, capsys
    )
    assert_one_line_error(code, err, expected)
    assert not (run / "last.pt").exists() and not (run / "tb").exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["data.val_split=abc"], "data.val_split='abc': expected a number in [0, 1) or null"),
        (["data.skip_corrupt=maybe"], "data.skip_corrupt='maybe': expected true or false"),
        (["eval.batch_size=abc"], "eval.batch_size='abc': expected an integer >= 1 or null"),
    ],
)
def test_eval_bad_override_one_line_naming_the_key(args, expected, reference, tmp_path, monkeypatch, capsys):
    """cvt-eval checks the data keys of the config it evaluates with (the checkpoint's, under the overrides)."""
    code, err = run_entry(
        eval_module,
        [
            f"ckpt={reference / 'last.pt'}",
            f"data.root={tmp_path / 'no-data'}",
            *args,
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_unknown_key_is_one_line(tmp_path, monkeypatch, capsys):
    """Hydra's strict mode finds it; cli.check_overrides reports it in one line before Hydra starts."""
    code, err = run_entry(
        train_module, [*BASE, "trainer.epoch=3", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys
    )
    assert code == 2 and err.strip().startswith("error: trainer.epoch: unknown key; known keys: accum_steps, ")
    assert len(err.strip().splitlines()) == 1 and " epochs, " in err
    assert not (tmp_path / "run").exists()


def test_accumulation_longer_than_an_epoch(cifar, tmp_path):
    with pytest.raises(UserError, match=r"^trainer.accum_steps=7: more than the 6 batches of an epoch; lower"):
        trainer_module.train(compose_train(overrides(cifar, 0, "trainer.accum_steps=7")), tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_batch_smaller_than_ranks_share(cifar):
    """data.batch_size is per process, so it can never be smaller than the number of ranks; what can go wrong is
    a rank's share of the data holding less than one batch. The data module names it (4 ranks: 75 images each)."""
    from cvt_train.data import build_data

    cfg = compose_train(overrides(cifar, 0, "data.batch_size=100"))
    with pytest.raises(UserError, match=r"data.batch_size=100: larger than the 75 training images per rank .*4 rank"):
        build_data(cfg, rank=0, world_size=4)


# ----------------------------------------------------------------------------------------------------------------
# Full disk, unwritable output dir


def copy_run(reference: Path, run: Path) -> Path:
    run.mkdir(parents=True)
    for name in ("last.pt", "best.pt", "metrics.json"):
        (run / name).write_bytes((reference / name).read_bytes())
    return run


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_full_one_line_previous_checkpoint_intact(cifar, reference, tmp_path):
    """A real write failure from the OS: files may not grow past 1 MB (RLIMIT_FSIZE, as a full disk would stop
    them; a checkpoint is 7 MB). Resuming a finished 3-epoch run for a 4th epoch fails at its checkpoint."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    run = copy_run(reference, tmp_path / "run")
    before = {name: sha(run / name) for name in ("last.pt", "best.pt")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cvt_train.train",
            *overrides(cifar),
            "trainer.epochs=4",
            "trainer.resume=auto",
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        preexec_fn=small_files,
        timeout=300,
    )
    assert_one_line_error(
        proc.returncode,
        proc.stderr,
        "could not write checkpoint",
        "free disk space",
        "the previous checkpoint is intact",
    )
    assert {name: sha(run / name) for name in ("last.pt", "best.pt")} == before
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("fault", ["read_only_dir", "no_space_mid_write"])
def test_unwritable_output_previous_checkpoint_intact(fault, cifar, reference, tmp_path, monkeypatch):
    run = copy_run(reference, tmp_path / "run")
    before = sha(run / "last.pt")
    if fault == "read_only_dir" and os.geteuid() != 0:
        run.chmod(0o555)  # (root writes anyway: then the refusal is simulated below)
    elif fault == "read_only_dir":
        real_mkstemp = checkpoint_module.tempfile.mkstemp

        def refuse(*args, prefix="", **kwargs):  # checkpoints only (config.yaml, metrics.json share the writer)
            if ".pt." in prefix:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real_mkstemp(*args, prefix=prefix, **kwargs)

        monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", refuse)
    else:
        real_save = torch.save

        def half_then_enospc(obj, f):
            real_save(obj, f)
            f.truncate(f.tell() // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(checkpoint_module.torch, "save", half_then_enospc)
    try:
        with pytest.raises(UserError) as e:
            trainer_module.train(compose_train(overrides(cifar, 0, "trainer.epochs=4", "trainer.resume=auto")), run)
    finally:
        run.chmod(0o755)
    message = str(e.value)
    assert "\n" not in message and "could not write checkpoint" in message and str(run) in message
    assert ("Permission denied" if fault == "read_only_dir" else "No space left on device") in message
    assert sha(run / "last.pt") == before and not list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------------------------
# Numerical faults


def nan_loss_from(monkeypatch, bad, poison=None):
    """Make the trainer's loss NaN on the calls (1-based) for which bad(n) is true; poison(model) at those calls."""
    real_loss, models = torch.nn.CrossEntropyLoss, []
    real_cvt = trainer_module.CvT

    class FaultyLoss(real_loss):
        calls = 0

        def forward(self, logits, targets):
            FaultyLoss.calls += 1
            loss = super().forward(logits, targets)
            if bad(FaultyLoss.calls):
                if poison is not None:
                    poison(models[0])
                    return loss
                return loss * float("nan")
            return loss

    monkeypatch.setattr(trainer_module.nn, "CrossEntropyLoss", FaultyLoss)
    monkeypatch.setattr(trainer_module, "CvT", lambda cfg: models.append(real_cvt(cfg)) or models[-1])


def record_saves(monkeypatch) -> dict:
    """{file name: sha256 after its last write} as the trainer writes checkpoints."""
    hashes, real_save = {}, trainer_module.save_atomic

    def save(obj, path):
        real_save(obj, path)
        hashes[Path(path).name] = sha(Path(path))

    monkeypatch.setattr(trainer_module, "save_atomic", save)
    return hashes


def assert_finite_checkpoint(path: Path) -> None:
    for key, t in load(path)["model"].items():
        assert not t.is_floating_point() or bool(torch.isfinite(t).all()), f"{path.name}: {key} is not finite"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_loss_stops_after_k_steps_keeping_last_good(precision, cifar, tmp_path, monkeypatch):
    """NaN loss from step 8 on (epoch 2 step 2), trainer.max_nonfinite=3: stops at epoch 2 step 4 with the epoch-1
    checkpoints."""
    nan_loss_from(monkeypatch, lambda n: n >= 8)
    saved = record_saves(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(
        UserError,
        match=r"training diverged: non-finite loss for 3 consecutive steps "
        r"\(epoch 2, step 4\).*last good checkpoint.*last.pt.*is intact",
    ) as e:
        trainer_module.train(
            compose_train(overrides(cifar, 0, f"trainer.precision={precision}", "trainer.max_nonfinite=3")), run
        )
    assert "\n" not in str(e.value)
    assert set(saved) == {"last.pt", "best.pt"} and load(run / "last.pt")["epoch"] == 1
    for name, digest in saved.items():
        assert sha(run / name) == digest  # what epoch 1 wrote, untouched since
        assert_finite_checkpoint(run / name)


def test_nonfinite_weights_never_saved(cifar, tmp_path, monkeypatch):
    """BatchNorm running statistics that went NaN while every loss stayed finite (K is never reached): the run
    stops at the end of the epoch instead of evaluating and saving them over the epoch-1 checkpoints."""

    def poison(model):
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.data.fill_(float("nan"))  # .data: autograd saved this tensor for the backward pass

    nan_loss_from(monkeypatch, lambda n: n == 9, poison=poison)
    saved = record_saves(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(
        UserError,
        match=r"training diverged: .*running_var holds NaN/inf after epoch 2; "
        r"the last good checkpoint.*is intact",
    ):
        trainer_module.train(compose_train(overrides(cifar)), run)
    assert load(run / "last.pt")["epoch"] == 1 and sha(run / "last.pt") == saved["last.pt"]
    assert json.loads((run / "metrics.json").read_text())["epoch"] == 1
    assert_finite_checkpoint(run / "last.pt")


def test_diverging_run_cli_one_line_nothing_saved(cifar, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    code, err = run_entry(
        train_module,
        [*overrides(cifar), "optim.lr=1e30", "trainer.max_nonfinite=3", f"hydra.run.dir={run}"],
        monkeypatch,
        capsys,
    )
    assert_one_line_error(code, err, "training diverged", "no checkpoint was written", "lower optim.lr")
    assert not (run / "last.pt").exists()


def test_fp16_grad_scaler_skips_nonfinite_steps(cifar, tmp_path, monkeypatch):
    """fp16 autocast works on CPU: two NaN steps (fewer than K) are skipped by the GradScaler, which halves its
    scale each time, and the run goes on."""
    nan_loss_from(monkeypatch, lambda n: n in (3, 4))
    run = tmp_path / "run"
    trainer_module.train(
        compose_train(
            overrides(
                cifar,
                0,
                "trainer.precision=fp16",
                "trainer.epochs=1",
                "trainer.max_steps_per_epoch=5",
                "data.batch_size=10",
                "data.val_subset=20",
            )
        ),
        run,
    )
    ckpt = load(run / "last.pt")
    assert ckpt["scaler"]["scale"] == 2.0**16 / 4 and ckpt["global_step"] == 5
    assert_finite_checkpoint(run / "last.pt")
