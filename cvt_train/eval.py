"""`cvt-eval`: Top-1 / Top-5 / loss / params / GMACs / images/s of a checkpoint, written to eval.json.

Our checkpoints carry their config as plain data: the model and the data pipeline are rebuilt from it (nothing in a
checkpoint is instantiated or resolved), then the user's overrides are applied on top. Official and HF weight files
carry no config: name the architecture (`model=cvt13`) and the data (`data=imagenet data.root=...`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .cli import check_overrides, friendly_errors
from .config import EvalSection, EvalTrainer, check_group  # (importing config registers the schemas)
from .data.transforms import aug_config
from .errors import UserError
from .flops import count_macs
from .models import CvT, ModelConfig, model_config, num_params
from .models.convert import extract_state_dict, head_classes, load_checkpoint, read_file
from .schema import as_plain_data

log = logging.getLogger("cvt_train")
GROUPS = ("model", "data", "aug")


def is_own_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj


def stored_config(obj: dict, source: Any) -> DictConfig:
    """The config stored in one of our checkpoints, as a DictConfig whose every value reads back as stored."""
    try:
        config = as_plain_data(obj["config"])
    except UserError as e:
        raise UserError(f"{source}: {e}") from e
    for group in GROUPS:
        if group in config and not isinstance(config[group], dict):
            raise UserError(
                f"{source}: the stored config's {group!r} entry is a {type(config[group]).__name__}, "
                "not a mapping; not a checkpoint this package wrote"
            )
    return OmegaConf.create(config)


def load_model(path: str | Path, use_ema: bool = False) -> CvT:
    """The model of one of our checkpoints (or of a file cvt-export format=safetensors wrote), built from its stored
    config, in eval mode."""
    if str(path).endswith(".safetensors"):
        from .export import load_safetensors

        return load_safetensors(path).eval()
    obj = read_file(path)
    if not is_own_checkpoint(obj):
        raise UserError(
            f"{path}: not a cvt-train checkpoint; for official / HF weights build the model with "
            "create_model(...) and call load_checkpoint(model, path)"
        )
    config = stored_config(obj, path)
    if "model" not in config:
        raise UserError(
            f"{path}: the stored config has no 'model' entry; build the model with create_model(...) "
            "and call load_checkpoint(model, path)"
        )
    model = CvT(model_config(config.model))
    load_checkpoint(model, obj, use_ema=use_ema)
    return model.eval()


def user_overrides() -> tuple[set[str], list[str]]:
    """Groups the user chose (`data=imagenet`) and keys the user set (`data.root=...`) on the command line."""
    groups, keys = set(), []
    for item in HydraConfig.get().overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        if "." in key:
            keys.append(key)
        else:
            groups.add(key)
    return groups, keys


def checkpoint_groups(cfg: DictConfig, obj: Any, groups: set[str], keys: list[str], example: str) -> DictConfig:
    """The model / data / aug sections to use a checkpoint with (cvt-eval, cvt-export): one of ours brings its own
    (plain data), under the groups the user chose and the keys the user set; a weight file without a config takes
    the user's, who must then name the model (`example` says how)."""
    if is_own_checkpoint(obj):
        stored = stored_config(obj, f"ckpt={cfg.ckpt}")
        out = OmegaConf.create({g: stored[g] for g in GROUPS if g in stored})
        for g in GROUPS:
            if g in groups or g not in out:
                out[g] = cfg[g]
        for key in keys:
            if key.split(".")[0] in GROUPS:
                OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)
        return out
    if "model" not in groups:
        raise UserError(f"ckpt: {cfg.ckpt} is not a cvt-train checkpoint (no stored config); name its {example}")
    return OmegaConf.create({g: OmegaConf.to_container(cfg[g], resolve=True) for g in GROUPS})


def eval_config(cfg: DictConfig, obj: Any) -> DictConfig:
    """The config to evaluate with: the checkpoint's own (for our checkpoints) under the user's overrides."""
    groups, keys = user_overrides()
    example = "architecture and data, e.g. model=cvt13 data=imagenet data.root=/data/imagenet"
    out = checkpoint_groups(cfg, obj, groups, keys, example)
    out.trainer = cfg.trainer
    out.eval = cfg.eval
    if cfg.eval.resolution:
        out.data.image_size = int(cfg.eval.resolution)
    if cfg.eval.batch_size:
        out.data.batch_size = int(cfg.eval.batch_size)
    for key in ("data.train_subset", "data.val_subset"):  # a subset a run was trained with (a smoke run's) is not
        if key not in keys:  # what an evaluation of a split means: only cvt-eval's own
            OmegaConf.update(out, key, None, merge=False)
    return out


def validate(cfg: DictConfig, ecfg: DictConfig) -> ModelConfig:
    """cvt-eval's checks, once, before any data is read: its own keys (eval.*, trainer.*), then the config it
    evaluates with (the checkpoint's under the overrides: plain data, so its data and aug sections are checked
    against their schemas here; keys the schema does not know are left as they are, plain data). Returns the
    model config it checked."""
    check_group(cfg, "eval", EvalSection)
    check_group(cfg, "trainer", EvalTrainer)
    check_group(ecfg, "data", keep_unknown=True)
    aug_config(ecfg.aug)
    mc = model_config(ecfg.model)
    if mc.num_classes != ecfg.data.num_classes:
        raise UserError(f"model.num_classes={mc.num_classes} does not match data.num_classes={ecfg.data.num_classes}")
    return mc


def evaluate_checkpoint(cfg: DictConfig, run_dir: str | Path) -> dict:
    from .data import build_data
    from .engine.distributed import resolve_device
    from .engine.evaluate import evaluate
    from .engine.precision import autocast, autocast_dtype, precision_name

    obj = read_file(cfg.ckpt)
    ecfg = eval_config(cfg, obj)
    mc = validate(cfg, ecfg)
    sd = extract_state_dict(obj, use_ema=cfg.eval.ema, source=str(cfg.ckpt))
    classes = head_classes(sd)
    if classes is not None and classes != ecfg.data.num_classes:
        raise UserError(
            f"ckpt: {cfg.ckpt} classifies {classes} classes but data={ecfg.data.name} has "
            f"{ecfg.data.num_classes}; evaluate it on data with {classes} classes (data=cifar10: 10, "
            "data=cifar100: 100, data=imagenet: 1000, data=folder data.num_classes=N)"
        )
    model = CvT(mc)
    fmt = load_checkpoint(
        model,
        sd,
        source=f"ckpt={cfg.ckpt}",
        advice=f"the checkpoint does not fit model={mc.name}: "
        "pass the model= (and model.* overrides) its weights were made for",
    )
    device = resolve_device(cfg.trainer.device)
    model = model.to(device).eval()
    if cfg.eval.split == "test":
        ecfg.data.val_split = 0.0  # the dataset's own test/val split, whatever training held out
    data = build_data(ecfg, rank=0, world_size=1, device=device, train=False, eval_on_train=cfg.eval.split == "train")
    batches = data.val_batches()
    amp_dtype = autocast_dtype(cfg.trainer.precision, device)
    size = int(ecfg.data.image_size)
    bar = tqdm(total=data.num_val, desc=f"eval {cfg.eval.split}", disable=not cfg.eval.progress, dynamic_ncols=True)
    start = time.perf_counter()
    metrics = evaluate(model, batches, device, autocast(device, amp_dtype), bar, tta=cfg.eval.tta)
    seconds = time.perf_counter() - start
    bar.close()
    result = {
        **metrics,
        "params": num_params(model),
        "gmacs": count_macs(model, (mc.in_chans, size, size)) / 1e9,
        "images_per_s": metrics["images"] / max(seconds, 1e-9),
        "precision": precision_name(amp_dtype),
        "checkpoint": str(cfg.ckpt),
        "checkpoint_format": fmt,
        "ema": bool(cfg.eval.ema),
        "split": cfg.eval.split,
        "tta": cfg.eval.tta,
        "resolution": size,
        "model": mc.name,
        "data": ecfg.data.name,
        "mean": list(ecfg.data.mean),
        "std": list(ecfg.data.std),
        "device": str(device),
    }
    Path(run_dir, "eval.json").write_text(json.dumps(result, indent=2))
    keys = ("top1", "top5", "loss", "tta_top1", "tta_top5", "images", "params", "gmacs", "images_per_s")
    print(json.dumps({k: result[k] for k in keys if k in result}))
    return result


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
@friendly_errors
def run(cfg: DictConfig) -> float:
    return evaluate_checkpoint(cfg, HydraConfig.get().runtime.output_dir)["top1"]


def main() -> None:
    check_overrides("eval")
    run()


if __name__ == "__main__":
    main()
