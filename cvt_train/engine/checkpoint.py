"""Checkpoints: one file holds everything a run needs to resume; written atomically, read as data only.

Layout (all plain tensors / numbers / strings / dicts, loadable with `weights_only=True`):
    model, ema (or None), optimizer, scheduler, scaler (or None): state dicts
    epoch: completed epochs; step: batches done in the epoch in progress (0 at an epoch boundary)
    global_step, best_top1, metrics (last evaluation), rng (torch / numpy / python states: rng_states())
    config: the run's resolved config as a plain dict (never instantiated)
    classes: the data's class names, index = label (cvt-export's id2label; absent in older checkpoints)
    format_version: 1
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import UserError
from ..models.convert import read_file

FORMAT_VERSION = 1


def save_atomic(obj: Any, path: str | Path) -> None:
    """A checkpoint written to a temporary file in the same folder, fsynced, then renamed over `path`: a crash
    leaves the old file."""

    def write(f) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer reports a full disk (ENOSPC, EFBIG) as a RuntimeError
            raise OSError(f"write failed: {e}") from e

    _replace_atomically(path, write, "could not write checkpoint", "the previous checkpoint is intact")


def write_text_atomic(text: str, path: str | Path) -> None:
    """Small text files (metrics.json, config.yaml) the same way: a full disk leaves the previous version."""
    _replace_atomically(
        path, lambda f: f.write(text.encode()), "could not write", "the checkpoints written so far are intact"
    )


def _replace_atomically(path: str | Path, write: Callable[[BinaryIO], Any], failed: str, intact: str) -> None:
    """write(f) into `.NAME.XXXX.tmp` beside `path`, flush, fsync, rename over `path`, fsync the folder; an OSError
    on the way becomes one UserError line ("PATH: {failed} (reason); ...; {intact}") and removes the temporary."""
    path = Path(path)
    _saves[path.name] = _saves.get(path.name, 0) + 1
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e, failed, intact) from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"save:{path.name}", _saves[path.name])
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e, failed, intact) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, e: OSError, failed: str, intact: str) -> UserError:
    reason = " ".join(str(e.strerror or e).split())  # one line, so the advice after it is not cut off
    return UserError(f"{path}: {failed} ({reason}); free disk space or fix the output dir's permissions; {intact}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files save_atomic (each as big as a checkpoint) and write_text_atomic leave when a
    process is killed mid-write; returns them."""
    stale = sorted(Path(folder).glob(".*.tmp"))  # .last.pt.XXXX.tmp, .metrics.json.PID.tmp, ...
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def load_training_checkpoint(path: str | Path) -> dict:
    """Read one of our checkpoints (data only) and check it has what resuming needs."""
    ckpt = read_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(
            f"{path}: not a cvt-train checkpoint (no 'model' and 'config' entries); "
            "for official or HF weights use cvt-eval with model=... or load_checkpoint()"
        )
    return ckpt


def rng_states() -> dict:
    """The host generators' states. No CUDA states: every batch reseeds torch (CPU and CUDA) from (seed, epoch,
    step, rank), so they carry nothing a resume needs, and one state per visible GPU would tie the checkpoint to
    the GPU count of the machine that wrote it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as plain data, so weights_only loading accepts it
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
    }


def restore_rng(states: dict) -> None:
    """The host generators; a "cuda" entry (checkpoints of earlier versions) is ignored, whatever GPUs are here."""
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


# ----------------------------------------------------------------------------------------------------------------
# Test hook: fault injection. tests/test_reliability.py and scripts/fault_drill.py set
#     CVT_FAULT_INJECT=kill_at=<point>:<n>
# to make the training process SIGKILL itself at an exact moment:
#     step:N   right after the N-th optimizer step of the run (global step, counted across resumes; one of
#              Trainer.step_hooks)
#     eval:N   during the evaluation after epoch N (after its first batch; evaluate.py: run_evaluation)
#     save:NAME:N   inside the N-th write of NAME (last.pt, best.pt, metrics.json, ...) by this process: the
#                   temporary file is written and fsynced, not yet renamed over NAME
# Unset (as always outside those tests) it does nothing.
_saves: dict[str, int] = {}


def fault_point(point: str, n: int) -> None:
    if os.environ.get("CVT_FAULT_INJECT") == f"kill_at={point}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)
