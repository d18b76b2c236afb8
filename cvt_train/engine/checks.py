"""Checks of a composed training config, made before any data is read or any device memory is taken."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import UserError
from ..models import model_config, stage_map_sizes
from .distributed import resolve_device
from .precision import check_precision


# The scalar keys the loop reads: (type, smallest value[, may be null]). The YAML configs are untyped, so without
# this check `trainer.epochs=abc` would end in a TypeError deep inside the loop instead of one line.
SCALARS = {
    "trainer.epochs": (int, 1), "trainer.accum_steps": (int, 1), "trainer.max_nonfinite": (int, 1),
    "trainer.eval_every": (int, 1), "trainer.log_every": (int, 1), "trainer.seed": (int, 0),
    "trainer.max_steps_per_epoch": (int, 1, True), "trainer.grad_clip": (float, 0, True),
    "trainer.ema.decay": (float, 0), "data.batch_size": (int, 1), "data.image_size": (int, 1),
    "data.num_classes": (int, 1), "optim.lr": (float, 0, True), "optim.base_lr": (float, 0),
    "optim.base_batch_size": (int, 1), "optim.weight_decay": (float, 0), "sched.warmup_epochs": (float, 0),
    "sched.warmup_lr": (float, 0), "sched.min_lr": (float, 0), "optim.fused": (bool, None),
    **{f"trainer.{k}": (bool, None) for k in ("channels_last", "compile", "sync_bn", "deterministic", "progress",
                                             "ema.enabled", "ema.warmup")},
}


def check_scalar(cfg: DictConfig, key: str, kind: type, minimum, nullable: bool = False) -> None:
    what = {bool: "true or false", int: f"an integer >= {minimum}", float: f"a number >= {minimum}"}[kind]
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as e:  # `???` in the config: a value the user must give
        raise UserError(f"{key} is not set; set {key}=<{what}>") from e
    if value is None and nullable:
        return
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        ok = ok and value >= minimum
    if not ok:
        raise UserError(f"{key}={value!r}: expected {what}{' or null' if nullable else ''}")


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked before any data is read or any device memory is taken (Trainer calls it
    before joining the process group)."""
    for key, spec in SCALARS.items():
        check_scalar(cfg, key, *spec)
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
    changed = [f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in sorted(set(old) | set(new))
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
