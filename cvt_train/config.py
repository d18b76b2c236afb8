"""The config schema: one dataclass per Hydra config group and one per app (cvt-train, cvt-eval, cvt-bench),
registered in Hydra's ConfigStore. `train.yaml` / `eval.yaml` / `bench.yaml` name their schema as the first entry
of their defaults list, so every group YAML is a set of values over these dataclasses: OmegaConf itself refuses a
wrong type or an unknown key, naming the key.

A field's `rule(...)` metadata says what the types cannot (ranges, choices; see schema.py). `check_group` checks
one section against its schema: each app's one `validate(cfg)` (engine/checks.py, eval.py, bench.py) calls it per
group and adds the rules across fields. The model's and the augmentation's own schemas live beside their code
(models/presets.py, data/transforms.py) and are checked there, as `model_config` and `aug_config` build them.

Stored checkpoint configs stay plain data: where a section of one is checked against its schema, every string in
it is escaped first (schema.as_plain_data), so nothing in it is resolved, and nothing is ever instantiated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from .data.transforms import AugConfig
from .models.presets import ModelConfig
from .schema import check_values, rule, typed


@dataclass
class DataConfig:
    name: str = MISSING
    root: str | None = None
    num_classes: int = rule(MISSING, ge=1)
    image_size: int = rule(224, ge=1)
    mean: list[float] = rule([0.485, 0.456, 0.406], expected="3 numbers (per RGB channel, 0..1 pixel scale)", length=3)
    std: list[float] = rule(
        [0.229, 0.224, 0.225], expected="3 numbers > 0 (per RGB channel, 0..1 pixel scale)", length=3, item_gt=0
    )
    batch_size: int = rule(64, ge=1)
    num_workers: int | None = rule(None, ge=0)  # null: from the CPUs of this rank (engine/allocation.py)
    decode: str = rule("auto", choices=("auto", "full", "scaled", "gpu"), what="decoder")  # data/decode.py
    augment_on: str = rule("auto", choices=("auto", "device", "workers"), what="place")  # data/batch_stage.py
    format: str = rule("files", choices=("files", "shards"), what="format")  # shards: scripts/make_shards.py
    shard_window: int = rule(8, ge=1)  # shards: the epoch shuffles shards, then samples within runs of this many
    download: bool = False
    val_split: float | None = rule(
        0.0, ge=0, lt=1, hint="0 validates on the dataset's val/test split, 0.1 holds out 10% of train instead"
    )
    train_subset: int | None = rule(None, ge=1)
    val_subset: int | None = rule(None, ge=1)
    skip_corrupt: bool = False
    in_memory: bool = False
    cache_dir: str | None = None


@dataclass
class OptimConfig:
    name: str = rule("adamw", choices=("adamw", "sgd"), what="optimizer")
    lr: float | None = rule(None, ge=0)
    base_lr: float = rule(5e-4, ge=0)
    base_batch_size: int = rule(512, ge=1)
    weight_decay: float = rule(0.05, ge=0)
    betas: list[float] = rule(
        [0.9, 0.999], expected="two numbers in [0, 1), e.g. optim.betas=[0.9,0.999]", length=2, item_ge=0, item_lt=1
    )
    eps: float = rule(1e-8, ge=0)
    fused: bool = True
    momentum: float = rule(0.9, ge=0)
    nesterov: bool = False


@dataclass
class SchedConfig:
    name: str = rule("cosine", choices=("cosine", "linear", "constant", "multistep"), what="schedule")
    warmup_epochs: float = rule(0.0, ge=0)
    warmup_lr: float = rule(1e-6, ge=0)
    min_lr: float = rule(0.0, ge=0)
    milestones: list[float] = rule([], item_ge=0)  # multistep: epochs at which the rate is multiplied by gamma
    gamma: float = rule(0.1, gt=0, le=1)


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = rule(0.9998, ge=0, lt=1, hint="e.g. 0.9998; 1 would never update the average")
    warmup: bool = True


@dataclass
class ResizeConfig:
    """Progressive resizing (engine/resize.py): the training inputs grow from min_size to data.image_size."""

    min_size: int | None = rule(None, ge=1)  # null: off
    ramp: list[float] = rule(
        [0.0, 0.75], length=2, item_ge=0, item_le=1, expected="[start, end] fractions of the epochs, start <= end"
    )  # min_size until `start` of the epochs, then linear growth, data.image_size from `end` on
    multiple: int = rule(8, ge=1)  # sizes are rounded to multiples of this (the model's total stride: whole maps)


PRECISIONS = ("bf16", "fp16", "fp32", "auto")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass
class TrainerConfig:
    epochs: int = rule(100, ge=1)
    device: str = "auto"
    precision: str = rule("auto", choices=PRECISIONS, what="precision")
    grad_clip: float | None = rule(None, ge=0)
    accum_steps: int = rule(1, ge=1)
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = rule("default", choices=COMPILE_MODES, what="torch.compile mode")
    tf32: bool = True
    threads: int | None = rule(None, ge=1)
    dist_timeout_min: float = rule(60.0, ge=1)
    sync_bn: bool = False
    seed: int = rule(0, ge=0)
    deterministic: bool = False
    eval_every: int = rule(1, ge=1)
    eval_tta: str | None = rule(None, choices=(None, "flip"), what="test-time augmentation")  # also tta_top1
    time_budget_min: float | None = rule(None, gt=0)  # plan the epochs to end within N minutes (engine/budget.py)
    time_budget_replan: bool = True  # re-plan the remaining epochs after each one from their measured time
    resume: str | None = None
    init_from: str | None = None
    max_nonfinite: int = rule(5, ge=1)
    max_steps_per_epoch: int | None = rule(None, ge=1)
    log_every: int = rule(20, ge=1)
    progress: bool = True
    profile: bool = False
    ema: EmaConfig = field(default_factory=EmaConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ablation: dict[str, Any] = field(default_factory=dict)  # free-form knobs that recipes interpolate (experiment/)


@dataclass
class EvalSection:
    split: str = rule("val", choices=("val", "test", "train"), what="split")
    tta: str | None = rule(None, choices=(None, "flip"), what="test-time augmentation")  # flip: also tta_top1
    resolution: int | None = rule(None, ge=1)
    ema: bool = False
    batch_size: int | None = rule(None, ge=1)
    progress: bool = True


@dataclass
class EvalTrainer:
    device: str = "auto"
    precision: str = rule("auto", choices=PRECISIONS, what="precision")
    seed: int = rule(0, ge=0)


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
    mode: str = rule("train", choices=("train", "infer"), what="mode")
    batch_size: int = rule(16, ge=1)
    resolution: int = rule(224, ge=1)
    steps: int = rule(20, ge=1)
    warmup: int = rule(3, ge=0)
    compare: str | None = rule(None, choices=(None, "hf", "eager"), what="reference")
    compile: bool = False
    channels_last: bool = False
    peak_size: int | None = rule(None, ge=1)
    threads: int | None = rule(None, ge=1)


@dataclass
class BenchTrainer:
    precision: str = rule("bf16", choices=PRECISIONS, what="precision")


@dataclass
class BenchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"
    seed: int = 0
    trainer: BenchTrainer = field(default_factory=BenchTrainer)
    bench: BenchSection = field(default_factory=BenchSection)


@dataclass
class ExportConfig:
    """cvt-export's keys; the model / data / aug groups are read as cvt-eval reads them (export.py)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    ckpt: str = MISSING
    format: str = rule("hf", choices=("hf", "official", "safetensors", "onnx"), what="format")
    out: str = MISSING
    ema: bool = False
    allow_approx: bool = False
    check_images: int = rule(8, ge=1)
    opset: int | None = rule(None, ge=7)
    image_size: int | None = rule(None, ge=1)


SCHEMAS = {"train": TrainConfig, "eval": EvalConfig, "bench": BenchConfig, "export": ExportConfig}
GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "aug": AugConfig,
    "optim": OptimConfig,
    "sched": SchedConfig,
    "trainer": TrainerConfig,
}


def register() -> None:
    cs = ConfigStore.instance()
    for app, cls in SCHEMAS.items():
        cs.store(name=f"{app}_schema", node=cls)


register()


def check_group(cfg: Any, group: str, schema: type | None = None, keep_unknown: bool = False) -> DictConfig:
    """typed() then check_values() for cfg[group] (a typed or a plain section); returns the typed section."""
    schema = schema or GROUPS[group]
    node = typed(cfg[group], schema, f"{group}.", keep_unknown=keep_unknown)
    check_values(node, schema, f"{group}.")
    return node
