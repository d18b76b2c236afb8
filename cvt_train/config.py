"""The config schema: one dataclass per Hydra config group and one per app (cvt-train, cvt-eval, cvt-bench),
registered in Hydra's ConfigStore. `train.yaml` / `eval.yaml` / `bench.yaml` name their schema as the first entry
of their defaults list, so every group YAML is a set of values over these dataclasses: OmegaConf itself refuses a
wrong type or an unknown key, naming the key.

A field's metadata says what the types cannot: the range (`ge`, `gt`, `lt`, `le`), the allowed values
(`choices`), a phrase for what to give (`expected`) and a `hint`. `expected_text` turns them into the one-line
"expected ..." phrase for type errors (cli.py maps OmegaConf's ValidationError to it). The range checks still run
from engine/checks.py's SCALARS table, which repeats these ranges: one `validate(cfg)` per app reading this metadata
is the next step (issue 14), and deletes that table.

Stored checkpoint configs are never merged into these classes as a whole: they stay plain data (see eval.py).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .data.transforms import AugConfig
from .models.presets import ModelConfig, StageConfig


def _f(default: Any = MISSING, **meta: Any) -> Any:
    """A field with a range / choices / hint in its metadata; a list default is copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = MISSING
    root: Optional[str] = None
    num_classes: int = _f(MISSING, ge=1)
    image_size: int = _f(224, ge=1)
    mean: List[float] = _f([0.485, 0.456, 0.406], expected="3 numbers (per RGB channel, 0..1 pixel scale)", length=3)
    std: List[float] = _f([0.229, 0.224, 0.225], expected="3 numbers > 0 (per RGB channel, 0..1 pixel scale)",
                          length=3, item_gt=0)
    batch_size: int = _f(64, ge=1)
    num_workers: int = _f(0, ge=0)
    download: bool = False
    val_split: Optional[float] = _f(0.0, ge=0, lt=1, hint="0 validates on the dataset's val/test split, 0.1 holds "
                                                          "out 10% of train instead")
    train_subset: Optional[int] = _f(None, ge=1)
    val_subset: Optional[int] = _f(None, ge=1)
    skip_corrupt: bool = False
    in_memory: bool = False
    cache_dir: Optional[str] = None


@dataclass
class OptimConfig:
    name: str = _f("adamw", choices=("adamw", "sgd"), what="optimizer")
    lr: Optional[float] = _f(None, ge=0)
    base_lr: float = _f(5e-4, ge=0)
    base_batch_size: int = _f(512, ge=1)
    weight_decay: float = _f(0.05, ge=0)
    betas: List[float] = _f([0.9, 0.999], expected="two numbers in [0, 1), e.g. optim.betas=[0.9,0.999]",
                            length=2, item_ge=0, item_lt=1)
    eps: float = _f(1e-8, ge=0)
    fused: bool = True
    momentum: float = _f(0.9, ge=0)
    nesterov: bool = False


@dataclass
class SchedConfig:
    name: str = _f("cosine", choices=("cosine", "constant"), what="schedule")
    warmup_epochs: float = _f(0.0, ge=0)
    warmup_lr: float = _f(1e-6, ge=0)
    min_lr: float = _f(0.0, ge=0)


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = _f(0.9998, ge=0, lt=1, hint="e.g. 0.9998; 1 would never update the average")
    warmup: bool = True


PRECISIONS = ("bf16", "fp16", "fp32", "auto")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass
class TrainerConfig:
    epochs: int = _f(100, ge=1)
    device: str = "auto"
    precision: str = _f("auto", choices=PRECISIONS, what="precision")
    grad_clip: Optional[float] = _f(None, ge=0)
    accum_steps: int = _f(1, ge=1)
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = _f("default", choices=COMPILE_MODES, what="torch.compile mode")
    tf32: bool = True
    dist_timeout_min: float = _f(60.0, ge=1)
    sync_bn: bool = False
    seed: int = _f(0, ge=0)
    deterministic: bool = False
    eval_every: int = _f(1, ge=1)
    resume: Optional[str] = None
    init_from: Optional[str] = None
    max_nonfinite: int = _f(5, ge=1)
    max_steps_per_epoch: Optional[int] = _f(None, ge=1)
    log_every: int = _f(20, ge=1)
    progress: bool = True
    profile: bool = False
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ablation: Dict[str, Any] = field(default_factory=dict)  # free-form knobs that recipes interpolate (experiment/)


@dataclass
class EvalSection:
    split: str = _f("val", choices=("val", "test", "train"), what="split")
    resolution: Optional[int] = _f(None, ge=1)
    ema: bool = False
    batch_size: Optional[int] = _f(None, ge=1)
    progress: bool = True


@dataclass
class EvalTrainer:
    device: str = "auto"
    precision: str = _f("auto", choices=PRECISIONS, what="precision")
    seed: int = _f(0, ge=0)


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    ckpt: str = MISSING
    eval: EvalSection = field(default_factory=EvalSection)
    trainer: EvalTrainer = field(default_factory=EvalTrainer)


@dataclass
class BenchSection:
    mode: str = _f("train", choices=("train", "infer"), what="mode")
    batch_size: int = _f(16, ge=1)
    resolution: int = _f(224, ge=1)
    steps: int = _f(20, ge=1)
    warmup: int = _f(3, ge=0)
    compare: Optional[str] = _f(None, choices=(None, "hf", "eager"), what="reference")
    compile: bool = False
    channels_last: bool = False
    peak_size: Optional[int] = _f(None, ge=1)
    threads: Optional[int] = _f(None, ge=1)


@dataclass
class BenchTrainer:
    precision: str = _f("bf16", choices=PRECISIONS, what="precision")


@dataclass
class BenchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"
    seed: int = 0
    trainer: BenchTrainer = field(default_factory=BenchTrainer)
    bench: BenchSection = field(default_factory=BenchSection)


SCHEMAS = {"train": TrainConfig, "eval": EvalConfig, "bench": BenchConfig}
GROUPS = {"model": ModelConfig, "data": DataConfig, "aug": AugConfig, "optim": OptimConfig, "sched": SchedConfig,
          "trainer": TrainerConfig}


def register() -> None:
    cs = ConfigStore.instance()
    for app, cls in SCHEMAS.items():
        cs.store(name=f"{app}_schema", node=cls)


register()


# ------------------------------------------------------------------------------------------ reading the schema
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), True
    return tp, False


def key_parts(full_key: str) -> list[str]:
    """`model.stages[0].depth` (OmegaConf's spelling) -> ['model', 'stages', '0', 'depth']."""
    return [p for p in re.split(r"[.\[\]]+", str(full_key)) if p]


def display_key(full_key: str) -> str:
    """The key as written on the command line: `model.stages.0.depth`."""
    return ".".join(key_parts(full_key))


def lookup(schema: type, full_key: str) -> Optional[tuple[dataclasses.Field, Any]]:
    """(field, its type) of `full_key` in the dataclass `schema`; list indices pass through to the item type and
    a list item's own key (`optim.betas[1]`) stands for the list. None where the key is not in the schema."""
    cls, found = schema, None
    for part in key_parts(full_key):
        if found is not None:
            inner = _unwrap(found[1])[0]
            if typing.get_origin(inner) in (list, List) and part.isdigit():
                item = typing.get_args(inner)[0] if typing.get_args(inner) else Any
                if dataclasses.is_dataclass(item):
                    cls, found = item, None
                continue  # an item of a list of scalars: the list's field stands for it
            inner_cls = inner if dataclasses.is_dataclass(inner) else None
            if inner_cls is None:
                return None
            cls = inner_cls
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        fld = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if fld is None:
            return None
        found = (fld, _hints(cls)[part])
    return found


def _num(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def expected_text(fld: dataclasses.Field, tp: Any) -> str:
    """What a field takes, in words: 'an integer >= 1', 'a number in [0, 1) or null (hint)', 'true or false'."""
    meta = fld.metadata
    inner, nullable = _unwrap(tp)
    if "expected" in meta:
        what = meta["expected"]
    elif "choices" in meta:
        what = "one of " + ", ".join("null" if c is None else str(c) for c in meta["choices"])
        nullable = False
    elif inner is bool:
        what = "true or false"
    elif inner in (int, float):
        what = "an integer" if inner is int else "a number"
        lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
        hi = (")", meta["lt"]) if "lt" in meta else ("]", meta["le"]) if "le" in meta else None
        if lo and hi:
            what = f"{what} in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        elif lo:
            what = f"{what} {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        elif hi:
            what = f"{what} {'<' if hi[0] == ')' else '<='} {_num(hi[1])}"
    elif inner is str:
        what = "a string"
    elif typing.get_origin(inner) in (list, List):
        what = "a list"
    elif dataclasses.is_dataclass(inner):
        what = "a mapping of its keys"
    else:
        what = "a value"
    what += " or null" if nullable else ""
    return what + (f" ({meta['hint']})" if "hint" in meta else "")


def shown(value: Any) -> str:
    """A value as the messages show it: 'abc' quoted, numbers and lists as written."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value)


def type_error_message(schema: type, full_key: str, value: Any, prefix: str = "") -> Optional[str]:
    """One line for a value of the wrong type at `full_key` (OmegaConf's ValidationError), from the schema; None
    where the key is not in the schema."""
    found = lookup(schema, full_key)
    if found is None:
        return None
    key = display_key(f"{prefix}{full_key}")
    parts = key_parts(key)
    fld, tp = found
    if parts and parts[-1].isdigit() and parts[-1] != fld.name and typing.get_origin(_unwrap(tp)[0]) in (list, List) \
            and not dataclasses.is_dataclass((typing.get_args(_unwrap(tp)[0]) or [None])[0]):
        key = ".".join(parts[:-1])  # optim.betas.1 -> optim.betas: the list is what the user gives
    return f"{key}={shown(value)}: expected {expected_text(fld, tp)}"
