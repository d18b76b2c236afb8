"""cvt-train: train, evaluate, benchmark and sweep CvT (arXiv 2103.15808) with modern PyTorch."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UserError
from .export import export_hf, export_official, export_onnx, export_safetensors, load_safetensors
from .flops import count_macs
from .models import CvT, ModelConfig, create_backbone, model_config, official_spec_to_config, preset_names
from .models.convert import load_checkpoint

__version__ = "0.1.0"


def create_model(name_or_config: Any = "cvt13", **overrides: Any) -> CvT:
    """A CvT from a preset name (`cvt13`, `cvt21`, `cvtw24`, the CIFAR presets), a model config dict / DictConfig,
    or a ModelConfig; overrides are top-level keys (`num_classes=10`, `act="gelu"`) or dotted paths
    (`**{"stages.0.patch_stride": 2}`)."""
    return CvT(model_config(name_or_config, **overrides))


def load_model(path: str | Path, use_ema: bool = False) -> CvT:
    """The model of one of our checkpoints (`best.pt`, `last.pt`), built from the config stored in it (read as
    plain data, never instantiated), with its weights or, with use_ema, its EMA weights; in eval mode."""
    from .eval import load_model as load  # (the cvt-eval module; imported on use, it pulls in Hydra)

    return load(path, use_ema=use_ema)


def from_official_spec(spec: Mapping, num_classes: int = 1000, **overrides: Any) -> CvT:
    """A CvT from the MODEL.SPEC block of an official CvT yaml (upper-case keys, INIT included)."""
    return CvT(model_config(official_spec_to_config(spec, num_classes), **overrides))


__all__ = [
    "create_model",
    "create_backbone",
    "from_official_spec",
    "load_checkpoint",
    "load_model",
    "count_macs",
    "CvT",
    "ModelConfig",
    "UserError",
    "preset_names",
    "export_hf",
    "export_official",
    "export_onnx",
    "export_safetensors",
    "load_safetensors",
]
