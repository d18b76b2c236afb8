"""Checkpoints: one file holds everything a run needs to resume; written atomically, read as data only.

Layout (all plain tensors / numbers / strings / dicts, loadable with `weights_only=True`):
    model, ema (or None), optimizer, scheduler, scaler (or None): state dicts
    epoch: completed epochs; step: batches done in the epoch in progress (0 at an epoch boundary)
    global_step, best_top1, metrics (last evaluation), rng (torch / cuda / numpy / python states)
    config: the run's resolved config as a plain dict (never instantiated)
    format_version: 1
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models.convert import read_file

FORMAT_VERSION = 1


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash leaves the old file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: could not write checkpoint ({e.strerror or e}); free disk space or fix the "
                        "output dir's permissions; the previous checkpoint is intact") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_training_checkpoint(path: str | Path) -> dict:
    """Read one of our checkpoints (data only) and check it has what resuming needs."""
    ckpt = read_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a cvt-train checkpoint (no 'model' and 'config' entries); "
                        "for official or HF weights use cvt-eval with model=... or load_checkpoint()")
    return ckpt
