"""Checks of a composed training config, made before any data is read or any device memory is taken."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import COMPILE_MODES
from ..errors import UserError
from ..models import model_config, stage_map_sizes
from .distributed import resolve_device
from .precision import check_precision


# The scalar keys the loop and the data module read: (type, smallest value[, may be null[, bound the value must
# stay below]]). The YAML configs are untyped, so without this check `trainer.epochs=abc` would end in a TypeError
# deep inside the loop (or after the data was read) instead of one line.
# (The same ranges are declared in cvt_train/config.py's field metadata: this table goes when validate() reads it.)
SCALARS = {
    "trainer.epochs": (int, 1), "trainer.accum_steps": (int, 1), "trainer.max_nonfinite": (int, 1),
    "trainer.eval_every": (int, 1), "trainer.log_every": (int, 1), "trainer.seed": (int, 0),
    "trainer.max_steps_per_epoch": (int, 1, True), "trainer.grad_clip": (float, 0, True),
    "trainer.ema.decay": (float, 0, False, 1), "data.batch_size": (int, 1), "data.image_size": (int, 1),
    "data.num_classes": (int, 1), "data.num_workers": (int, 0), "data.val_split": (float, 0, True, 1),
    "optim.lr": (float, 0, True), "optim.base_lr": (float, 0), "optim.base_batch_size": (int, 1),
    "optim.weight_decay": (float, 0), "sched.warmup_epochs": (float, 0), "sched.warmup_lr": (float, 0),
    "sched.min_lr": (float, 0), "optim.fused": (bool, None), "trainer.dist_timeout_min": (float, 1),
    **{f"trainer.{k}": (bool, None) for k in ("channels_last", "compile", "sync_bn", "deterministic", "progress",
                                             "profile", "ema.enabled", "ema.warmup", "tf32")},
    **{f"data.{k}": (bool, None) for k in ("skip_corrupt", "download", "in_memory")},
}
# What a value means, where "expected ..." alone does not say what to give.
HINTS = {
    "data.val_split": "0 validates on the dataset's val/test split, 0.1 holds out 10% of train instead",
    "trainer.ema.decay": "e.g. 0.9998; 1 would never update the average",
}
# The names engine/optim.py builds (build_optimizer, build_scheduler), and the keys each optimizer reads.
OPTIMIZERS = {"adamw": ("optim.betas", "optim.eps"), "sgd": ("optim.momentum", "optim.nesterov")}
SCHEDULES = ("cosine", "constant")
OPTIM_SCALARS = {"optim.eps": (float, 0), "optim.momentum": (float, 0), "optim.nesterov": (bool, None)}


_ABSENT = object()


def _expected(kind: type, minimum, nullable: bool, below) -> str:
    if kind is bool:
        what = "true or false"
    elif kind is int:
        what = f"an integer >= {minimum}"
    else:
        what = f"a number in [{minimum}, {below})" if below is not None else f"a number >= {minimum}"
    return what + (" or null" if nullable else "")


def _shown(value):
    if isinstance(value, float) and value.is_integer():  # the schema types 1 as 1.0 for a float key: show what was typed
        return int(value)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_scalar(cfg: DictConfig, key: str, kind: type, minimum, nullable: bool = False, below=None,
                 missing_ok: bool = False) -> None:
    """One UserError line naming `key` when its value is not of `kind` in [minimum, below) (or null if nullable).
    missing_ok: a key absent from cfg is not checked (configs stored by older versions)."""
    what = _expected(kind, minimum, nullable, below)
    if missing_ok and OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
        return
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as e:  # `???` in the config: a value the user must give
        raise UserError(f"{key} is not set; set {key}=<{what.removesuffix(' or null')}>") from e
    if value is None and nullable:
        return
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        ok = ok and value >= minimum and (below is None or value < below)  # NaN fails both
    if not ok:
        hint = f" ({HINTS[key]})" if key in HINTS else ""
        raise UserError(f"{key}={_shown(value)!r}: expected {what}{hint}")


def check_scalars(cfg: DictConfig, prefix: str = "", missing_ok: bool = False) -> None:
    """check_scalar for every key of SCALARS that starts with `prefix`."""
    for key, spec in SCALARS.items():
        if key.startswith(prefix):
            check_scalar(cfg, key, *spec, missing_ok=missing_ok)


def check_choice(cfg: DictConfig, key: str, choices, what: str) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        chooser = key.split(".")[0] if key.endswith(".name") else key  # optim.name is chosen as optim=...
        raise UserError(f"{key}={_shown(value)!r}: unknown {what}; choose one of {', '.join(choices)} "
                        f"(e.g. {chooser}={choices[0]})")


def check_optim(cfg: DictConfig) -> None:
    """optim.name, sched.name and the keys the chosen optimizer reads (torch's own errors would come only after
    the data was read, as a traceback)."""
    check_choice(cfg, "optim.name", tuple(OPTIMIZERS), "optimizer")
    check_choice(cfg, "sched.name", SCHEDULES, "schedule")
    used = OPTIMIZERS[cfg.optim.name]
    for key, spec in OPTIM_SCALARS.items():  # the other optimizer's keys too, where the config has them
        check_scalar(cfg, key, *spec, missing_ok=key not in used)
    if "optim.betas" in used or "betas" in cfg.optim:
        betas = OmegaConf.select(cfg, "optim.betas")
        ok = OmegaConf.is_list(betas) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
        if not ok:
            raise UserError(f"optim.betas={_shown(betas)!r}: expected two numbers in [0, 1), e.g. "
                            "optim.betas=[0.9,0.999]")
    if cfg.optim.name == "sgd" and cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise UserError("optim.nesterov=true needs optim.momentum > 0; set optim.momentum=0.9 or "
                        "optim.nesterov=false")


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked before any data is read or any device memory is taken (Trainer calls it
    before joining the process group)."""
    check_scalars(cfg)
    check_optim(cfg)
    check_choice(cfg, "trainer.compile_mode", COMPILE_MODES, "torch.compile mode")
    check_precision(cfg.trainer.precision)
    resolve_device(cfg.trainer.device)  # a device name only; nothing is allocated
    mc = model_config(cfg.model)
    if mc.num_classes != cfg.data.num_classes:
        raise UserError(f"model.num_classes={mc.num_classes} does not match data.num_classes={cfg.data.num_classes} "
                        f"of data={cfg.data.name}; drop the model.num_classes override")
    stage_map_sizes(mc, (cfg.data.image_size, cfg.data.image_size))
    resume, init_from = cfg.trainer.resume, cfg.trainer.init_from
    if init_from is not None and not Path(str(init_from)).exists():
        raise UserError(f"trainer.init_from: {init_from} does not exist; give a weight file (ours, official or HF) or "
                        "an HF save_pretrained folder")
    if resume not in (None, "auto") and not Path(str(resume)).is_file():
        raise UserError(f"trainer.resume: {resume} does not exist; give a checkpoint path or trainer.resume=auto")


def resume_mismatch(path: Path, ckpt: dict, cfg: DictConfig, error: Exception) -> UserError:
    """One line for a checkpoint that does not fit the run resuming it, naming the config keys that differ."""
    stored = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    now = OmegaConf.to_container(cfg, resolve=True)
    groups = ("model", "optim", "sched", "trainer")
    old, new = (flatten({g: c.get(g) or {} for g in groups}) for c in (stored, now))
    changed = [f"{k}={_shown(old.get(k))!r} (now {_shown(new.get(k))!r})" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in ("trainer.resume", "trainer.progress")]
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:120]
    made_with = f"it was made with {', '.join(changed[:4])}" if changed else "it was made with another configuration"
    return UserError(f"{path}: does not fit this run ({reason}); {made_with}; resume with the overrides it was "
                     "trained with")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}."))
        else:
            out[key] = v
    return out
