"""Entry-point glue: bad input reaches the user as one `error: ...` line and a non-zero exit.

Set HYDRA_FULL_ERROR=1 (or CVT_DEBUG=1) to see the full traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from omegaconf.errors import OmegaConfBaseException

from .errors import UserError

EXIT_USER_ERROR = 2


def _debug() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("CVT_DEBUG") == "1"


def friendly_errors(fn: Callable) -> Callable:
    """Wrap a task function (inside @hydra.main) so UserError and config errors print one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OmegaConfBaseException) as e:
            if _debug():
                raise
            print(f"error: {e}".splitlines()[0] if isinstance(e, UserError) else f"error: {_one_line(e)}",
                  file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    key = getattr(e, "full_key", None)
    return f"{key}: {text}" if key and key not in text else text


def prepare_distributed_argv() -> None:
    """Under torchrun, only rank 0 writes Hydra's run dir; the other ranks log to stderr and write nothing.

    (The trainer broadcasts rank 0's run dir, so every rank resumes from the same checkpoint.)
    """
    if int(os.environ.get("RANK", "0")) == 0:
        return
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra/hydra_logging=none",
                 "hydra.run.dir=.", "hydra.sweep.dir=."]
