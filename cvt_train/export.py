"""`cvt-export`: weights going out, to HF transformers, the official layout, safetensors and ONNX.

    cvt-export ckpt=outputs/.../best.pt format=hf out=exported/cvt13-cifar10       # + ema=true for the EMA weights
    cvt-export ckpt=outputs/.../best.pt format=onnx out=exported/onnx
    cvt-export ckpt=CvT-13-224x224-IN-1k.pth model=cvt13 format=hf out=exported/hf  # official / HF files: name model=

A Hydra app, not argparse, for the command line the other apps have (key=value, `model=`/`data=` groups): official
and HF weight files carry no config, so they name their architecture as cvt-eval's do (`model=cvt13`), and the
images the logit checks run on come from the same data configs (a checkpoint's own, under the user's overrides).
Hydra writes nothing here: no run dir, no .hydra/, logs to stdout; the only output is `out`.

Every format is checked after writing: the written file is read back by its consumer (transformers, our loader,
onnxruntime) and its logits compared with the model's on real validation images when the data is at hand (random
inputs otherwise); the largest absolute difference is printed and, for `hf`, written into the model card.
Nothing in a checkpoint is executed or instantiated: files are read with weights_only=True, configs as plain data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .flops import count_macs
from .models import CvT, ModelConfig, model_config, num_params
from .models.convert import (
    extract_state_dict,
    head_classes,
    hf_config,
    hf_differences,
    load_checkpoint,
    official_differences,
    official_spec,
    read_file,
    to_format,
)

log = logging.getLogger("cvt_train")
GROUPS = ("model", "data", "aug")
CONFIG_KEY = "cvt_train.model_config"  # safetensors metadata: the model config as JSON


# ------------------------------------------------------------------------------------------------- Python API
@torch.no_grad()
def max_logit_diff(model: nn.Module, other, images: torch.Tensor) -> float:
    """Largest |logit difference| between `model` and `other` (a callable images -> logits), in fp32."""
    model.eval()
    return float((model(images).float() - torch.as_tensor(other(images)).float()).abs().max())


def check_images(
    model: CvT, images: torch.Tensor | None, label: str = "given images", n: int = 4
) -> tuple[torch.Tensor, str]:
    """The images the logit checks run on, and what they are: the given ones, or seeded random inputs."""
    if images is not None:
        return images.float(), f"{len(images)} {label}"
    g = torch.Generator().manual_seed(0)
    size = model.cfg.image_size
    return torch.randn(n, model.cfg.in_chans, size, size, generator=g), f"{n} random inputs (no data given)"


def export_hf(
    model: CvT,
    folder: str | Path,
    class_names: Sequence[str] | None = None,
    allow_approx: bool = False,
    images: torch.Tensor | None = None,
    info: Mapping | None = None,
    images_label: str = "given images",
) -> dict:
    """A `save_pretrained` folder for transformers' CvtForImageClassification: config.json (with id2label from
    class_names), model.safetensors and a model card (README.md) with `info` (data, recipe, metrics).

    A model HF's port cannot build is refused with one line; one it computes differently (QuickGELU, another
    LayerNorm eps) is refused unless allow_approx. The folder is loaded back with from_pretrained, which must find
    every key, and its logits compared with ours on `images`; the difference goes into the card and the result."""
    cfg = hf_config(model.cfg, allow_approx=allow_approx)
    _, approximations = hf_differences(model.cfg)
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(model.cfg.num_classes)]
    if len(names) != model.cfg.num_classes:
        raise UserError(f"class names: {len(names)} names for a model with {model.cfg.num_classes} classes")
    cfg.id2label = dict(enumerate(names))
    cfg.label2id = {name: i for i, name in enumerate(names)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    _save_safetensors(to_format(model.state_dict(), "hf"), folder / "model.safetensors", {"format": "pt"})

    import transformers

    hf, loading = transformers.CvtForImageClassification.from_pretrained(folder, output_loading_info=True)
    bad = {k: v for k, v in loading.items() if v}
    if bad:  # our key mapping and HF's model disagree: a bug here, not the user's
        raise RuntimeError(f"{folder}: transformers loads the export with {bad}")
    images, source = check_images(model, images, images_label)
    diff = max_logit_diff(model, lambda x: hf.eval()(pixel_values=x).logits, images)
    result = {
        "format": "hf",
        "out": str(folder),
        "max_abs_logit_diff": diff,
        "checked_on": source,
        "approximations": approximations,
        "num_classes": len(names),
    }
    (folder / "README.md").write_text(model_card(model, {**(info or {}), "export": result}, class_names=names))
    return result


def export_official(model: CvT, path: str | Path, allow_approx: bool = False) -> dict:
    """The official microsoft/CvT layout: a bare state dict (`stage0.`, `norm.`, `head.`) in a .pth file, and
    beside it `<name>.yaml` with the MODEL.SPEC block the official code builds the model from."""
    missing, approx = official_differences(model.cfg)
    if missing:
        raise UserError(
            f"format=official: the official CvT code has no {'; '.join(missing)}; format=safetensors "
            "keeps this model whole"
        )
    if approx and not allow_approx:
        raise UserError(
            f"format=official: the official code would compute different logits: {'; '.join(approx)}; "
            "pass allow_approx=true to export the weights anyway"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_format(model.state_dict(), "official"), path)
    spec = {
        "MODEL": {"NAME": "cls_cvt", "NUM_CLASSES": model.cfg.num_classes, "SPEC": official_spec(model.cfg)},
        "TRAIN": {"IMAGE_SIZE": [model.cfg.image_size] * 2},
        "TEST": {"IMAGE_SIZE": [model.cfg.image_size] * 2},
    }
    from omegaconf import OmegaConf

    path.with_suffix(".yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(spec)))
    back = CvT(model.cfg)
    load_checkpoint(back, str(path))  # our loader, format detection included, strict
    images, source = check_images(model, None)
    return {
        "format": "official",
        "out": str(path),
        "spec": str(path.with_suffix(".yaml")),
        "max_abs_logit_diff": max_logit_diff(model, back.eval(), images),
        "checked_on": source,
        "approximations": approx,
    }


def export_safetensors(model: CvT, path: str | Path, metadata: Mapping[str, str] | None = None) -> dict:
    """The bare weights (our names) with the model config as JSON in the file's metadata (`cvt_train.model_config`):
    load_checkpoint(model, path) reads the weights, load_safetensors(path) builds the model too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", CONFIG_KEY: json.dumps(dataclasses.asdict(model.cfg)), **(metadata or {})}
    _save_safetensors(model.state_dict(), path, meta)
    back = load_safetensors(path)
    images, source = check_images(model, None)
    return {
        "format": "safetensors",
        "out": str(path),
        "max_abs_logit_diff": max_logit_diff(model, back, images),
        "checked_on": source,
    }


def load_safetensors(path: str | Path) -> CvT:
    """The model of a file export_safetensors wrote: its config from the metadata (JSON, read as plain data and
    validated like any model config), its weights strictly; in eval mode."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    if CONFIG_KEY not in meta:
        raise UserError(
            f"{path}: no {CONFIG_KEY} in its metadata (not written by cvt-export format=safetensors); "
            "build the model with create_model(...) and call load_checkpoint(model, path)"
        )
    try:
        config = json.loads(meta[CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: its {CONFIG_KEY} metadata is not JSON ({e})") from e
    model = CvT(model_config(config))
    load_checkpoint(model, str(path))
    return model.eval()


def export_onnx(
    model: CvT,
    path: str | Path,
    image_size: int | None = None,
    opset: int | None = None,
    images: torch.Tensor | None = None,
    images_label: str = "given images",
) -> dict:
    """`torch.onnx.export` with the dynamo exporter (needs onnxscript): input `images` (B, C, H, W) with a dynamic
    batch dimension, output `logits`. Checked with onnxruntime (when installed) against the model on `images`,
    at two batch sizes (the whole batch and one image): the result has the max abs difference and the opset."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency: a clear message instead of torch's)
    except ImportError as e:
        raise UserError(
            "format=onnx needs onnx and onnxscript (and onnxruntime to check the file): pip install 'cvt-train[export]'"
        ) from e
    model = model.eval()
    size = image_size or model.cfg.image_size
    images, source = check_images(model, images, images_label)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = images[:2] if len(images) >= 2 else images.expand(2, -1, -1, -1)  # batch 2: a batch of 1 specialises
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    program.save(str(path))
    result = {
        "format": "onnx",
        "out": str(path),
        "opset": _onnx_opset(path),
        "input": [None, model.cfg.in_chans, size, size],
    }
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: %s was not checked (pip install onnxruntime)", path)
        return {**result, "max_abs_logit_diff": None, "checked_on": "not checked (no onnxruntime)"}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])  # noqa: E731
    diffs = [max_logit_diff(model, run, x) for x in (images, images[:1])]
    return {**result, "max_abs_logit_diff": max(diffs), "checked_on": f"{source}, batch sizes {len(images)} and 1"}


def _onnx_opset(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    # contiguous copies: safetensors refuses views and tensors that share memory
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, str(path), metadata=dict(metadata)
    )


# ------------------------------------------------------------------------------------------------- model card
def model_card(model: CvT, info: Mapping, class_names: Sequence[str] | None = None) -> str:
    """README.md of an HF folder: the architecture, params, GMACs, the data and recipe, metrics.json, the export's
    check. `info`: {"data": {...}, "recipe": {...}, "metrics": {...}, "export": {...}} (each optional)."""
    mc: ModelConfig = model.cfg
    size = mc.image_size
    gmacs = count_macs(model, (mc.in_chans, size, size)) / 1e9
    data, recipe, metrics, export = (dict(info.get(k) or {}) for k in ("data", "recipe", "metrics", "export"))
    dataset = data.get("name")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-classification",
        "tags: [image-classification, cvt, cvt-train]",
        *([f"datasets: [{dataset}]"] if dataset else []),
        "---",
        "",
        f"# {mc.name} ({mc.num_classes} classes)",
        "",
        "CvT (Convolutional vision Transformer, Wu et al. 2021, arXiv 2103.15808), trained with cvt-train and "
        "exported for `transformers.CvtForImageClassification`.",
        "",
        "## Architecture",
        "",
        f"- parameters: {num_params(model):,}; GMACs at {size}x{size}: {gmacs:.3f}",
        f"- activation: {mc.act}; LayerNorm eps {mc.ln_eps}; input {mc.in_chans}x{size}x{size}",
        "",
        "| stage | dim | heads | depth | embedding (kernel/stride/padding) | q/k/v projection | kv stride "
        "| cls token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(mc.stages):
        embed = (
            f"patch {s.patch_stride}"
            if s.embed == "patch"
            else f"conv {s.patch_size}/{s.patch_stride}/{s.patch_padding}"
        )
        lines.append(
            f"| {i} | {s.dim_embed} | {s.num_heads}{' (scale 1/sqrt(head width))' if s.attn_scale == 'head' else ''} "
            f"| {s.depth} | {embed} | {s.qkv_proj_method} "
            f"k{s.kernel_qkv} | {s.stride_kv} | {'yes' if s.cls_token else 'no'} |"
        )
    if data or class_names:
        lines += ["", "## Data", ""] + [f"- {k}: {v}" for k, v in data.items()]
    if class_names:
        shown = ", ".join(class_names[:20]) + (f", ... ({len(class_names)} in all)" if len(class_names) > 20 else "")
        lines.append(f"- classes (id2label): {shown}")
    if recipe:
        lines += ["", "## Training recipe", ""] + [f"- {k}: {v}" for k, v in recipe.items()]
    if metrics:
        lines += ["", "## Metrics (metrics.json of the run)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if isinstance(v, (int, float, str))]
    if export:
        lines += [
            "",
            "## Export check",
            "",
            f"Logits of this folder in transformers vs cvt-train's model, fp32: max abs difference "
            f"{_fmt(export.get('max_abs_logit_diff'))} on {export.get('checked_on')}.",
        ]
        if export.get("approximations"):
            lines.append(
                "**Approximate export** (allow_approx=true): HF's CvT differs from the trained model in "
                + "; ".join(export["approximations"])
                + ". The difference above is that approximation's cost."
            )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import CvtForImageClassification",
        'model = CvtForImageClassification.from_pretrained("THIS_FOLDER_OR_REPO").eval()',
        "logits = model(pixel_values=images).logits  # images normalised with the data's mean/std",
        "```",
        "",
        "Upload with huggingface_hub's CLI: `hf upload USER/REPO THIS_FOLDER`.",
        "",
    ]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


# ------------------------------------------------------------------------------------------------- the app
def validate(cfg) -> None:
    """cvt-export's own keys, by the schema's rules (config.py: ExportConfig); the model and data are checked as
    they are built (model_config, build_data), from the checkpoint's config or the user's groups."""
    from omegaconf import OmegaConf

    from .config import ExportConfig
    from .schema import check_values

    for key in ("ckpt", "out"):
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise UserError(f"{key} is not set; e.g. cvt-export ckpt=outputs/.../best.pt format=hf out=exported/hf")
    check_values(cfg, ExportConfig, "", only={f.name for f in dataclasses.fields(ExportConfig)} - set(GROUPS))


def export_from_config(cfg, groups: set[str] = frozenset(), keys: set[str] = frozenset()) -> dict:
    """The whole command: read ckpt, build its model (its own config, or model= for weight files), gather class
    names / data / recipe / metrics, export in cfg.format to cfg.out, print the result as one JSON line."""
    from .eval import checkpoint_groups, is_own_checkpoint, stored_config

    validate(cfg)
    obj = read_file(cfg.ckpt)
    own = is_own_checkpoint(obj)
    source = f"ckpt={cfg.ckpt}"
    sd = extract_state_dict(obj, use_ema=cfg.ema, source=source)
    example = "architecture, e.g. model=cvt13 (and data=... for id2label and the logit check)"
    run = checkpoint_groups(cfg, obj, groups, list(keys), example)
    if own:
        stored = stored_config(obj, source)
        has_data = "data" in stored or "data" in groups
        recipe = _recipe(stored)
    else:
        classes = head_classes(sd)
        if classes is not None and "model.num_classes" not in keys:
            run.model.num_classes = classes
        has_data = "data" in groups or any(k.startswith("data.") for k in keys)
        recipe = {}
    model = CvT(model_config(run.model))
    load_checkpoint(
        model, sd, source=source, advice="pass the model= (and model.* overrides) its weights were made for"
    )
    model.eval()

    class_names = obj.get("classes") if own else None
    images = data_info = None
    if has_data and (cfg.format in ("hf", "onnx") or not class_names):
        images, class_names, data_info = _validation_images(run, cfg.check_images, class_names)
    info = {"data": data_info or {}, "recipe": recipe, "metrics": _metrics(cfg.ckpt, obj)}
    info["data"]["weights"] = "EMA" if cfg.ema else "raw (not EMA)"
    out = Path(cfg.out)
    if cfg.format == "hf":
        result = export_hf(model, out, class_names, cfg.allow_approx, images, info, "validation images")
    elif cfg.format == "official":
        result = export_official(model, out / f"{model.cfg.name}.pth", cfg.allow_approx)
    elif cfg.format == "safetensors":
        result = export_safetensors(model, out / f"{model.cfg.name}.safetensors")
    else:
        result = export_onnx(
            model, out / f"{model.cfg.name}.onnx", cfg.image_size, cfg.opset, images, "validation images"
        )
    print(json.dumps(result))
    return result


def _validation_images(run, n: int, class_names):
    """The first n validation images (normalised, as the model sees them), the data's class names, its summary."""
    from omegaconf import OmegaConf

    from .data import build_data

    dcfg = OmegaConf.create({"data": run.data, "aug": run.aug, "trainer": {"seed": 0}})
    OmegaConf.update(dcfg, "data.batch_size", n, merge=False)
    OmegaConf.update(dcfg, "data.num_workers", 0, merge=False)
    data = build_data(dcfg, rank=0, world_size=1, device="cpu", train=False)
    images = next(iter(data.val_batches()))[0][:n]
    summary = {k: OmegaConf.select(run, f"data.{k}") for k in ("name", "image_size", "mean", "std")}
    summary = {k: (list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v) for k, v in summary.items()}
    return images, list(class_names or data.classes), summary


def _recipe(run) -> dict:
    """A few recipe keys of a run's stored config (inert data), for the model card."""
    from omegaconf import OmegaConf

    keys = (
        "optim.name",
        "optim.lr",
        "optim.weight_decay",
        "sched.name",
        "trainer.epochs",
        "data.batch_size",
        "aug.name",
        "trainer.ema.enabled",
        "trainer.precision",
    )
    out = {}
    for key in keys:
        try:
            value = OmegaConf.select(run, key)
        except Exception:
            value = None
        if value is not None:
            out[key] = value
    return out


def _metrics(ckpt: str, obj: Any) -> dict:
    """metrics.json beside the checkpoint (the run's last evaluation), else the checkpoint's own `metrics`."""
    path = Path(ckpt).parent / "metrics.json"
    if Path(ckpt).is_file() and path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s: not JSON; the model card leaves the metrics out", path)
    metrics = obj.get("metrics") if isinstance(obj, dict) else None
    return dict(metrics) if isinstance(metrics, Mapping) else {}


def main() -> None:
    import hydra

    from . import config as _config  # noqa: F401  (registers the schemas, export_schema included)
    from .cli import check_overrides, friendly_errors
    from .eval import user_overrides

    try:  # transformers' "Loading weights" bar: noise in a command's output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass

    @hydra.main(config_path="conf", config_name="export", version_base="1.3")
    @friendly_errors
    def run(cfg) -> None:
        export_from_config(cfg, *user_overrides())

    check_overrides("export")
    run()


if __name__ == "__main__":
    main()
