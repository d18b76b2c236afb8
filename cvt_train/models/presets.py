"""Model configs: the schema (per-stage keys of the official MODEL.SPEC, lower-cased), presets, validation.

Presets live in `cvt_train/conf/model/*.yaml` (also the Hydra `model` group), so the command line and
`create_model("cvt13")` read the same file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import UserError
from ..schema import check_values, rule, typed

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PROJ_METHODS = ("dw_bn", "avg", "linear")
EMBED_METHODS = ("conv", "patch")
ACTS = ("quick_gelu", "gelu")


@dataclass
class StageConfig:
    embed: str = rule(
        "conv", choices=EMBED_METHODS, what="embedding"
    )  # conv: overlapping; patch: ViT-style, kernel == stride
    patch_size: int = rule(3, ge=1)
    patch_stride: int = rule(2, ge=1)
    patch_padding: int = rule(1, ge=0)
    dim_embed: int = rule(64, ge=1)
    depth: int = rule(1, ge=1)
    num_heads: int = rule(1, ge=1)
    mlp_ratio: float = rule(4.0, gt=0)
    qkv_bias: bool = True
    drop_rate: float = rule(0.0, ge=0, lt=1)
    attn_drop_rate: float = rule(0.0, ge=0, lt=1)
    drop_path_rate: float = rule(0.0, ge=0, lt=1)
    cls_token: bool = False
    pos_embed: bool = False
    qkv_proj_method: str = rule("dw_bn", choices=PROJ_METHODS, what="projection")
    kernel_qkv: int = rule(3, ge=1)
    padding_q: int = rule(1, ge=0)
    padding_kv: int = rule(1, ge=0)
    stride_q: int = rule(1, ge=1)
    stride_kv: int = rule(2, ge=1)
    # Softmax temperature: 1/sqrt(dim_embed) as the official code and HF scale it, or 1/sqrt(dim_embed / num_heads)
    # (the head width) as most transformers and the CIFAR zoo's CvT do. The same with one head.
    attn_scale: str = rule("dim", choices=("dim", "head"), what="attention scale")


@dataclass
class ModelConfig:
    name: str = "cvt"
    act: str = rule("quick_gelu", choices=ACTS, what="activation")  # official; "gelu" (exact) as in HF transformers
    num_classes: int = rule(1000, ge=0, hint="0 = no head")
    in_chans: int = rule(3, ge=1)
    image_size: int = rule(224, ge=1)  # the size position embeddings are made for; other sizes interpolate them
    ln_eps: float = rule(1e-5, gt=0)
    init: str = rule("trunc_norm", choices=("trunc_norm", "xavier"), what="init")
    stages: list[StageConfig] = field(default_factory=list)


def model_config(cfg: Any, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a preset name, a dict / DictConfig (e.g. Hydra's `cfg.model`) or a ModelConfig.

    Overrides are top-level keys (`num_classes=10`, `act="gelu"`) or dotted paths (`**{"stages.0.depth": 2}`).
    """
    if isinstance(cfg, ModelConfig):
        cfg = dataclasses.asdict(cfg)
    if isinstance(cfg, str):
        cfg = load_preset(cfg)
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    data = OmegaConf.create(dict(cfg))
    for key, value in overrides.items():
        try:
            OmegaConf.update(data, key, value, merge=False)
        except (OmegaConfBaseException, TypeError, IndexError) as e:  # e.g. stages.5.depth on a 3-stage model
            raise UserError(
                f"model.{key}: cannot set this key ({' '.join(str(e).split())}); "
                f"the model has {len(data.get('stages') or [])} stages, indexed from 0"
            ) from e
    data = OmegaConf.to_container(data, resolve=False)  # resolved above: a `${` left in a value is text
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError("model.stages: expected a non-empty list of per-stage dicts")
    for i, s in enumerate(stages):  # each stage alone first: OmegaConf names a nested list item's key without its path
        if not isinstance(s, Mapping):
            raise UserError(f"model.stages.{i}: expected a dict of stage keys, got {s!r}")
        check_values(typed(s, StageConfig, f"model.stages.{i}."), StageConfig, f"model.stages.{i}.")
    node = typed(data, ModelConfig, "model.")
    check_values(node, ModelConfig, "model.")
    mc = OmegaConf.to_object(node)
    validate(mc)
    return mc


def validate(cfg: ModelConfig) -> None:
    """The rules across keys (the schema's `rule`s checked each key alone), naming the stage and key."""
    for i, s in enumerate(cfg.stages):
        w = f"model.stages.{i}"
        if s.dim_embed % s.num_heads:
            raise UserError(f"{w}.num_heads: {s.num_heads} heads do not divide dim_embed {s.dim_embed}")
        if s.qkv_proj_method == "dw_bn":  # only dw_bn convolves q (avg and linear leave it as is)
            if s.stride_q != 1:
                raise UserError(
                    f"{w}.stride_q: a query stride of {s.stride_q} shrinks the output below the residual's size "
                    "(the official code has the same limit); use stride_q=1 and change stride_kv instead"
                )
            if s.kernel_qkv % 2 == 0:
                raise UserError(
                    f"{w}.kernel_qkv: an even kernel ({s.kernel_qkv}) cannot keep the query map's size; "
                    "use an odd kernel_qkv such as 3"
                )
            if 2 * s.padding_q + 1 != s.kernel_qkv:
                raise UserError(
                    f"{w}.padding_q: with kernel_qkv {s.kernel_qkv} the query map keeps its size only with "
                    f"padding_q {(s.kernel_qkv - 1) // 2}, got {s.padding_q}"
                )
        elif s.stride_q != 1:  # q is not projected at all: a stride would be silently ignored
            raise UserError(
                f"{w}.stride_q: qkv_proj_method={s.qkv_proj_method} leaves the queries unprojected, so "
                f"stride_q={s.stride_q} would have no effect; leave it at 1"
            )
        if s.qkv_proj_method == "avg" and 2 * s.padding_kv > s.kernel_qkv:
            raise UserError(
                f"{w}.padding_kv: average pooling allows at most half the kernel as padding "
                f"(kernel_qkv {s.kernel_qkv}), got {s.padding_kv}"
            )
    stage_map_sizes(cfg, (cfg.image_size, cfg.image_size))


def _conv_out(n: int, kernel: int, stride: int, padding: int, ceil: bool = False) -> int:
    span = n + 2 * padding - kernel
    if span < 0:
        return 0
    return (-(-span // stride) if ceil else span // stride) + 1


def stage_map_sizes(cfg: ModelConfig, image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The (H, W) of each stage's token map for an input size; a clear error where a map vanishes."""
    return [hw for hw, _ in stage_geometry(cfg, image_size)]


def stage_geometry(cfg: ModelConfig, image_size: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(token map, k/v map) sizes of each stage (the k/v map is the token map for `linear`); errors as above."""
    sizes, hw = [], tuple(image_size)
    for i, s in enumerate(cfg.stages):
        if s.embed == "patch":
            k, st, p = s.patch_stride, s.patch_stride, 0
        else:
            k, st, p = s.patch_size, s.patch_stride, s.patch_padding
        new = tuple(_conv_out(n, k, st, p) for n in hw)
        if min(new) < 1:
            raise UserError(
                f"model.stages.{i}.patch_stride: a {image_size[0]}x{image_size[1]} input leaves a {hw[0]}x{hw[1]} map "
                f"before stage {i}, too small for its embedding (kernel {k}, stride {st}, padding {p}); "
                "lower a patch_stride or raise the image size"
            )
        kv = new
        if s.qkv_proj_method != "linear":
            kv = tuple(
                _conv_out(n, s.kernel_qkv, s.stride_kv, s.padding_kv, ceil=s.qkv_proj_method == "avg") for n in new
            )
            if min(kv) < 1:
                raise UserError(
                    f"model.stages.{i}.kernel_qkv: the {new[0]}x{new[1]} map of stage {i} is too small for the k/v "
                    f"projection (kernel {s.kernel_qkv}, padding {s.padding_kv}); lower kernel_qkv or raise padding_kv"
                )
        sizes.append((new, kv))
        hw = new
    return sizes


def check_batch_of_one(cfg: ModelConfig, image_size: tuple[int, int]) -> None:
    """Training on one image: a dw_bn BatchNorm over a 1x1 map would see one value per channel, which BatchNorm
    refuses deep inside the forward; say which stage and what to do instead."""
    for i, (s, (hw, kv)) in enumerate(zip(cfg.stages, stage_geometry(cfg, image_size))):
        if s.qkv_proj_method == "dw_bn" and min(hw[0] * hw[1], kv[0] * kv[1]) == 1:
            raise UserError(
                f"model.stages.{i}: training on a batch of 1 at {image_size[0]}x{image_size[1]} leaves "
                f"the dw_bn projection's BatchNorm a 1x1 map, one value per channel; train with a batch "
                "of 2 or more, a larger image, or evaluate in eval mode"
            )


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"model: unknown preset {name!r}; choose one of {preset_names()}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


# Official MODEL.SPEC keys -> ours. A list gives one value per stage; a scalar applies to every stage.
_OFFICIAL_STAGE_KEYS = {f.name.upper(): f.name for f in fields(StageConfig)} | {"PATCH_SIZE": "patch_size"}


def official_spec_to_config(spec: Mapping, num_classes: int = 1000) -> dict:
    """The MODEL.SPEC block of an official CvT yaml (upper-case keys, INIT included) as our model config dict."""
    spec = dict(spec)
    num_stages = int(spec.pop("NUM_STAGES", len(spec.get("DIM_EMBED", [])) or 3))
    init = str(spec.pop("INIT", "trunc_norm"))
    stages: list[dict] = [{} for _ in range(num_stages)]
    for key, value in spec.items():
        ours = _OFFICIAL_STAGE_KEYS.get(key.upper())
        if ours is None:
            raise UserError(f"MODEL.SPEC.{key}: not a CvT spec key; known: {sorted(_OFFICIAL_STAGE_KEYS)}")
        values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value] * num_stages
        if len(values) != num_stages:
            raise UserError(f"MODEL.SPEC.{key}: {len(values)} values for NUM_STAGES={num_stages}")
        for stage, v in zip(stages, values):
            stage[ours] = v.lower() if isinstance(v, str) else v
    return {"name": "official", "num_classes": num_classes, "init": init, "stages": stages}
