"""Checks of a composed training config, made before any data is read or any device memory is taken."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import check_group
from ..data.transforms import aug_config
from ..errors import UserError
from ..models import model_config, stage_map_sizes
from . import resize
from .distributed import resolve_device
from .optim import check_min_lr


def validate(cfg: DictConfig) -> None:
    """cvt-train's checks of a composed config, made once before any data is read or any device memory is taken
    (Trainer calls it before joining the process group). The types are the schema's (cvt_train/config.py); this
    adds what types cannot say: each field's declared range or choices, and the rules across fields."""
    for group in ("data", "optim", "sched", "trainer"):
        check_group(cfg, group)
    aug_config(cfg.aug)  # its schema's rules and those across its keys
    if cfg.optim.name == "sgd" and cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise UserError("optim.nesterov=true needs optim.momentum > 0; set optim.momentum=0.9 or optim.nesterov=false")
    if cfg.optim.lr is not None:  # (a derived rate needs the world size: build_scheduler checks that one)
        check_min_lr(cfg.sched, cfg.optim.lr)
    resolve_device(cfg.trainer.device)  # a device name only; nothing is allocated
    mc = model_config(cfg.model)  # heads dividing widths, map sizes: models/presets.py's validate
    if mc.num_classes != cfg.data.num_classes:
        raise UserError(
            f"model.num_classes={mc.num_classes} does not match data.num_classes={cfg.data.num_classes} "
            f"of data={cfg.data.name}; drop the model.num_classes override"
        )
    stage_map_sizes(mc, (cfg.data.image_size, cfg.data.image_size))
    resize.check(cfg.trainer.resize, mc, cfg.data.image_size)
    resume, init_from = cfg.trainer.resume, cfg.trainer.init_from
    if init_from is not None and not Path(str(init_from)).exists():
        raise UserError(
            f"trainer.init_from: {init_from} does not exist; give a weight file (ours, official or HF) or "
            "an HF save_pretrained folder"
        )
    if resume not in (None, "auto") and not Path(str(resume)).is_file():
        raise UserError(f"trainer.resume: {resume} does not exist; give a checkpoint path or trainer.resume=auto")


def resume_mismatch(path: Path, ckpt: dict, cfg: DictConfig, error: Exception) -> UserError:
    """One line for a checkpoint that does not fit the run resuming it, naming the config keys that differ."""
    stored = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    now = OmegaConf.to_container(cfg, resolve=True)
    groups = ("model", "optim", "sched", "trainer")
    old, new = (flatten({g: c.get(g) or {} for g in groups}) for c in (stored, now))
    changed = [
        f"{k}={_shown(old.get(k))!r} (now {_shown(new.get(k))!r})"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and k not in ("trainer.resume", "trainer.progress")
    ]
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:120]
    made_with = f"it was made with {', '.join(changed[:4])}" if changed else "it was made with another configuration"
    return UserError(
        f"{path}: does not fit this run ({reason}); {made_with}; resume with the overrides it was trained with"
    )


def _shown(value):
    if (
        isinstance(value, float) and value.is_integer()
    ):  # the schema types 1 as 1.0 for a float key: show what was typed
        return int(value)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


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
