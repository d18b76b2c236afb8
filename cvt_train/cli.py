"""Entry-point glue: bad input reaches the user as one `error: ...` line and a non-zero exit.

Set HYDRA_FULL_ERROR=1 (or CVT_DEBUG=1) to see the full traceback instead.
"""

from __future__ import annotations

import atexit
import errno
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's convention for a process ended by Ctrl-C
_DISK_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EIO,
}


def _debug() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("CVT_DEBUG") == "1"


def friendly_errors(fn: Callable) -> Callable:
    """Wrap a task function (inside @hydra.main) so UserError and config errors print one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OmegaConfBaseException, OSError) as e:
            if _debug():
                raise
            if isinstance(e, UserError):
                message = str(e).splitlines()[0]
            elif isinstance(e, OSError):  # a disk, permission or file-system fault outside the checked writes
                where = f"{e.filename}: " if e.filename else ""
                advice = "; check the path, the free disk space and the permissions" if e.errno in _DISK_ERRNOS else ""
                message = f"{where}{e.strerror or e}{advice}"
            else:
                message = _schema_message(e, _app_name()) or _one_line(e)
            _fail(message)
        except KeyboardInterrupt:
            if _debug():
                raise
            print("error: interrupted (Ctrl-C); files written before it are intact", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    key = getattr(e, "full_key", None)
    return f"{key}: {text}" if key and key not in text else text


def _app_name() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().job.config_name
    except Exception:  # not under a running Hydra app
        return None


def _schema_message(e: BaseException, app: str | None, given: dict | None = None) -> str | None:
    """OmegaConf's ValidationError (a value of the wrong type for the schema, itself or as the cause of Hydra's
    "Error merging override"), as one line from the field's type and metadata: `trainer.epochs='abc': expected an
    integer >= 1`. `given`: the command line's values by key, shown instead of a list item's. None otherwise."""
    from omegaconf.errors import ValidationError

    from .config import SCHEMAS
    from .schema import display_key, key_parts, type_error_message

    cause = e if isinstance(e, ValidationError) else e.__cause__
    if not isinstance(cause, ValidationError) or not getattr(cause, "full_key", None) or app not in SCHEMAS:
        return None
    value = cause.value
    for n in range(len(key_parts(cause.full_key)), 0, -1):  # optim.betas[1] was given as optim.betas=[0.9,a]
        key = ".".join(key_parts(cause.full_key)[:n])
        if given and key in given:
            value = given[key]
            break
    message = type_error_message(SCHEMAS[app], cause.full_key, value)
    return message if message is not None else f"{display_key(cause.full_key)}: {' '.join(str(cause).split())}"


def _composition_message(e: Exception, app: str, given: dict) -> str:
    """One line for what Hydra's compose raised, from the exception's own fields (the override, the missing
    option and its group's options, the key OmegaConf names), not from Hydra's wording."""
    from hydra.errors import MissingConfigException, OverrideParseException

    from .config import SCHEMAS
    from .schema import schema_error

    if isinstance(e, OverrideParseException):  # a syntax error: Hydra's first line names what it could not read
        return f"{e.override}: {str(e).splitlines()[0]}"
    if isinstance(e, MissingConfigException) and e.options is not None:
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        return f"{group}={option}: no such option; choose one of {', '.join(e.options)}"
    if isinstance(e.__cause__, (ConfigKeyError, ConfigAttributeError)) and app in SCHEMAS:  # a key it lacks
        return str(schema_error(e.__cause__, SCHEMAS[app]))
    if isinstance(e, ValueError):  # `model=3`: a group's option must be a config's name
        bad = [f"{k}={v}" for k, v in given.items() if "." not in k and not isinstance(v, (str, list))]
        return f"{bad[0] if bad else 'overrides'}: {_one_line(e)}; give the name of a config in that group"
    return _schema_message(e, app, given) or _one_line(e)


def check_overrides(config_name: str) -> None:
    """Compose the config with the command line's overrides (Hydra's compose API) before Hydra starts. It stays
    because Hydra reports a composition error over several lines, and in a sweep only once jobs have started:
    here an unknown key or option, a wrong type or a bad sweep value ends in one `error:` line (exit 2) before any
    job runs, and an output dir that cannot be written is named before anything runs. In a sweep, each value is
    checked with the first of the others (Hydra's OverridesParser expands them: no public API lists a sweep's
    values). Command lines with Hydra flags (--help, --cfg, -cp, ...) are left to Hydra."""
    args = sys.argv[1:]
    if _debug() or any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return
    multirun = any(a in ("-m", "--multirun") for a in args)
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if a not in ("-m", "--multirun")])
    except HydraException as e:  # a syntax error
        _fail(_composition_message(e, config_name, {}))
    choices = []
    for o in parsed:
        if not o.is_sweep_override():
            choices.append([o.input_line])
            continue
        try:
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        except (HydraException, ValueError):  # interval(...) for a sweeper plugin, glob(...): only Hydra lists them
            continue
        if values:  # an empty sweep launches no job: nothing to check (each value can fail: the schema types it)
            choices.append(values)
    first = [c[0] for c in choices]
    variants = [first] + [first[:i] + [v] + first[i + 1 :] for i, c in enumerate(choices) for v in c[1:]]
    try:
        with initialize_config_module("cvt_train.conf", version_base="1.3"):
            for overrides in variants:
                cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError: `model=3`, not an option name
        given = {}
        for o in OverridesParser.create().parse_overrides(overrides):
            if not o.is_sweep_override():
                given[o.key_or_group] = o.value()
        _fail(_composition_message(e, config_name, given))
    _check_writable(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")


def _check_writable(cfg, key: str) -> None:
    try:
        folder = Path(str(OmegaConf.select(cfg, key)))
    except Exception:  # an interpolation only a running Hydra can resolve: Hydra will report it
        return
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        _fail(f"{key}={folder}: {existing} is a file, not a folder; set {key} to a folder you can write")
    try:  # a real write (os.access says yes to root, even where the file system refuses)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        _fail(f"{key}={folder}: cannot write in {existing} ({e.strerror or e}); set {key} to a folder you can write")


def prepare_distributed_argv() -> None:
    """Under torchrun, only rank 0 writes Hydra's run dir; the other ranks log to stderr and write nothing (a sweep's
    job dirs go to a temporary folder, removed at exit).

    (The trainer broadcasts rank 0's run dir, so every rank resumes from the same checkpoint.)
    """
    if int(os.environ.get("RANK", "0")) == 0:
        return
    scratch = tempfile.mkdtemp(prefix=f"cvt-train-rank{os.environ['RANK']}-")  # for -m or hydra.mode=MULTIRUN
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    sys.argv += [
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra/hydra_logging=none",
        "hydra.run.dir=.",
        "hydra.sweep.dir='{}'".format(scratch.replace("'", "\\'")),
    ]  # quoted: TMPDIR may hold , or =
