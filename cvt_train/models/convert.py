"""Weights from elsewhere: official microsoft/CvT state dicts, HF transformers' CvT, and our own checkpoints.

Our parameter names are the official ones with `stageN.` spelled `stages.N.`; HF's names are mapped one by one.
Each converter maps *our* key to the foreign key, so loading needs only the target model's own keys and every
foreign key left over is reported as unexpected. Files are read with `weights_only=True` (or safetensors):
nothing in a checkpoint is ever executed.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile


def official_name(key: str) -> str:
    return re.sub(r"^stages\.(\d+)\.", r"stage\1.", key)


def hf_name(key: str) -> str:
    k = re.sub(r"^stages\.(\d+)\.", r"cvt.encoder.stages.\1.", key)
    k = k.replace(".patch_embed.proj.", ".embedding.convolution_embeddings.projection.")
    k = k.replace(".patch_embed.norm.", ".embedding.convolution_embeddings.normalization.")
    k = re.sub(r"\.blocks\.(\d+)\.", r".layers.\1.", k)
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        proj = f".attention.attention.convolution_projection_{theirs}.convolution_projection."
        k = k.replace(f".attn.conv_proj_{ours}.conv.", proj + "convolution.")
        k = k.replace(f".attn.conv_proj_{ours}.bn.", proj + "normalization.")
        k = k.replace(f".attn.proj_{ours}.", f".attention.attention.projection_{theirs}.")
    k = k.replace(".attn.proj.", ".attention.output.dense.")
    k = k.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.")
    k = k.replace(".norm1.", ".layernorm_before.").replace(".norm2.", ".layernorm_after.")
    return re.sub(r"^norm\.", "layernorm.", re.sub(r"^head\.", "classifier.", k))


NAMERS = {"own": lambda k: k, "official": official_name, "hf": hf_name}


def to_format(state_dict: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our state dict in the key names of `fmt` ("official" or "hf")."""
    return {NAMERS[fmt](k): v for k, v in state_dict.items()}


def detect_format(state_dict: Mapping[str, Any]) -> str:
    keys = list(state_dict)
    if any(k.startswith(("cvt.encoder.", "classifier.", "layernorm.")) for k in keys):
        return "hf"
    if any(re.match(r"stage\d+\.", k) for k in keys):
        return "official"
    return "own"


def read_file(path: str | Path) -> Any:
    """Load a checkpoint file or an HF `save_pretrained` folder as data only, with one clear error per fault."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_file(path / name)
        raise UserError(f"{path}: a folder without model.safetensors or pytorch_model.bin; point to a weight file")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; check the path")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: checkpoint file is empty; it was probably cut off while being written")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise UserError(f"{path}: reading .safetensors needs `pip install safetensors`") from e
        try:
            return load_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save writes a zip, or (legacy) a binary pickle
        kind = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), "not a checkpoint")
        raise UserError(f"{path}: not a PyTorch checkpoint ({kind}); point to a .pt / .pth / .safetensors file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to the error below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met something that is not a tensor or plain data
        raise UserError(
            f"{path}: refused: the file holds objects that are not plain tensors and data ({_short(_detail(e))}), and "
            "loading it could run code; only load it in a sandbox and re-save its state_dict if you trust its "
            "origin"
        ) from e
    except Exception as e:  # a cut-off zip or a damaged pickle fails in many ways (RuntimeError, EOFError, KeyError...)
        raise _corrupt(path, e) from e


_OTHER_FORMATS = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"{", "text, JSON?"),
    (b"\x1f\x8b", "a gzip file"),
)


def _detail(e: Exception) -> str:
    """The specific part of torch's long weights_only message: the global it met, or the opcode it rejects."""
    found = re.search(r"GLOBAL [\w.]+|Unsupported operand \d+", str(e))
    return found.group(0) if found else "not loadable with weights_only=True"


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _corrupt(path: Path, e: Exception) -> UserError:
    return UserError(
        f"{path}: not a readable checkpoint, truncated or corrupt ({_short(f'{type(e).__name__}: {e}')}); "
        "copy it again or use another checkpoint"
    )


def extract_state_dict(obj: Any, use_ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint: our {model, ema, ...} dict, {state_dict: ...}, or a bare state dict."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{source}: expected a dict of tensors, found a {type(obj).__name__}")
    if use_ema:
        if not isinstance(obj.get("ema"), Mapping):
            raise UserError(f"{source}: has no EMA weights; train with trainer.ema.enabled=true or set eval.ema=false")
        obj = obj["ema"]
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{source}: entry {k!r} is not a tensor; is this a model checkpoint?")
        for prefix in _WRAPPER_PREFIXES:
            k = k.removeprefix(prefix)
        if k.startswith("encoder.stages."):  # HF's bare CvtModel (the backbone, saved without its `cvt.` wrapper)
            k = "cvt." + k
        sd[k] = v
    return sd


def head_classes(sd: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of a state dict's classifier (ours / official `head.weight`, HF `classifier.weight`)."""
    weight = next((v for k, v in sd.items() if k.endswith(("head.weight", "classifier.weight"))), None)
    return None if weight is None else int(weight.shape[0])


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: Any,
    strict: bool = True,
    drop_head: bool = False,
    use_ema: bool = False,
    *,
    source: str = "state dict",
    advice: str = "build the model the weights were made for, or pass strict=False",
) -> str:
    """Load own / official / HF weights into `model`, detecting the format; returns the format's name.

    strict: every key of the model must be found and every key of the file used, or one error lists them.
    drop_head: keep the model's freshly initialised classifier (fine-tuning to another class count).
    source, advice: what error messages call a state dict passed in (a path names itself), and what they tell the
    user to do (command-line callers name their options).
    """
    obj = path_or_state_dict
    if isinstance(obj, (str, Path)):
        source, obj = str(obj), read_file(obj)
    sd = extract_state_dict(obj, use_ema=use_ema, source=source)
    fmt = detect_format(sd)
    target = model.state_dict()
    mapping = {NAMERS[fmt](k): k for k in target}
    # the file's head keys, also when the model has none (num_classes=0): HF calls them classifier.*
    head_keys = {NAMERS[fmt](k) for k in (*target, "head.weight", "head.bias") if k.startswith("head.")}
    renamed, unexpected = {}, []
    for k, v in sd.items():
        if drop_head and k in head_keys:
            continue
        if k in mapping:
            renamed[mapping[k]] = v
        else:
            unexpected.append(k)
    missing = [k for k in target if k not in renamed and not (drop_head and k.startswith("head."))]
    bad_shapes = [
        f"{k} {tuple(v.shape)} in file vs {tuple(target[k].shape)} in model"
        for k, v in renamed.items()
        if v.shape != target[k].shape
    ]
    if bad_shapes:
        hint = (
            " (a head for another class count: pass drop_head=True to fine-tune)"
            if all(s.startswith("head.") for s in bad_shapes)
            else ""
        )
        raise UserError(
            f"{source}: shape mismatch for {len(bad_shapes)} key(s): {'; '.join(bad_shapes[:6])}{hint}; {advice}"
        )
    if strict and (missing or unexpected):
        raise UserError(
            f"{source} ({fmt} format) does not fit the model: {len(missing)} missing key(s){_few(missing)}, "
            f"{len(unexpected)} unexpected key(s){_few(unexpected)}; {advice}"
        )
    model.load_state_dict(renamed, strict=False)
    return fmt


def _few(keys: list[str], n: int = 8) -> str:
    """' [a, b]' for a short list, ' (first 8: [...])' for a long one, '' for none."""
    if not keys:
        return ""
    return f" {keys}" if len(keys) <= n else f" (first {n}: {keys[:n]})"


# ------------------------------------------------------------------------------------------- weights going out
def hf_differences(mc) -> tuple[list[str], list[str]]:
    """Where HF transformers' CvT port departs from a model config (a ModelConfig): what it cannot build or run at
    all, and what it computes differently (its logits would not be ours). HF hard-codes exact GELU and LayerNorm
    eps 1e-5 (its `layer_norm_eps` is read by nothing), has no position embedding, no average-pooling or plain
    linear projection (its "avg" builds no convolution and then calls it), sizes every stage's cls token by the last
    stage's width, reads the last stage's cls token in its classifier, and indexes drop-path rates by the stage's
    index. Drop path and dropout change no eval-mode logit: they are carried over as they are."""
    missing, approx = [], []
    last = len(mc.stages) - 1
    for i, s in enumerate(mc.stages):
        w = f"model.stages.{i}"
        if s.pos_embed:
            missing.append(f"{w}.pos_embed=true (no position embeddings)")
        if s.qkv_proj_method != "dw_bn":
            missing.append(f"{w}.qkv_proj_method={s.qkv_proj_method} (only dw_bn runs)")
        if s.cls_token and i < last:
            missing.append(f"{w}.cls_token=true (a cls token only in the last stage)")
        if s.depth <= i:
            missing.append(f"{w}.depth={s.depth} (depth > {i} needed in stage {i})")
    if not mc.stages[last].cls_token:
        missing.append(f"model.stages.{last}.cls_token=false (its classifier reads the last stage's cls token)")
    if mc.act != "gelu":
        approx.append(f"model.act={mc.act} (HF uses exact GELU)")
    if mc.ln_eps != 1e-5:
        approx.append(f"model.ln_eps={mc.ln_eps} (HF fixes 1e-5)")
    return missing, approx + head_scaled(mc, "HF")


def head_scaled(mc, who: str) -> list[str]:
    """The stages whose attention logits differ from the official scaling (by the head width, with several heads)."""
    return [
        f"model.stages.{i}.attn_scale=head ({who} scales attention by the stage's whole width)"
        for i, s in enumerate(mc.stages)
        if s.attn_scale == "head" and s.num_heads > 1
    ]


def hf_config(
    mc,
    allow_approx: bool = False,
    context: str = "format=hf",
    advice: str = "format=safetensors or format=official keep it whole",
):
    """HF transformers' CvtConfig for our model config; one UserError line (prefixed with `context`, ending with
    `advice`) for a model HF cannot build, and for one it computes differently unless allow_approx."""
    try:
        import transformers
    except ImportError as e:
        raise UserError(f"{context} needs HF transformers: pip install 'cvt-train[hf]'") from e
    missing, approx = hf_differences(mc)
    if missing:
        raise UserError(
            f"{context}: HF's CvT has no {'; '.join(missing)}; this model cannot be expressed there ({advice})"
        )
    if approx and not allow_approx:
        raise UserError(
            f"{context}: HF's CvT would compute different logits: {'; '.join(approx)}; pass "
            "allow_approx=true to export it anyway (the measured logit difference goes into the model "
            "card)"
        )
    per_stage = lambda f: [f(s) for s in mc.stages]  # noqa: E731
    patch = lambda s: s.embed == "patch"  # noqa: E731  ViT-style patches = a conv with kernel == stride, no padding
    return transformers.CvtConfig(
        num_channels=mc.in_chans,
        num_labels=mc.num_classes,
        patch_sizes=per_stage(lambda s: s.patch_stride if patch(s) else s.patch_size),
        patch_stride=per_stage(lambda s: s.patch_stride),
        patch_padding=per_stage(lambda s: 0 if patch(s) else s.patch_padding),
        embed_dim=per_stage(lambda s: s.dim_embed),
        num_heads=per_stage(lambda s: s.num_heads),
        depth=per_stage(lambda s: s.depth),
        mlp_ratio=per_stage(lambda s: s.mlp_ratio),
        attention_drop_rate=per_stage(lambda s: s.attn_drop_rate),
        drop_rate=per_stage(lambda s: s.drop_rate),
        drop_path_rate=per_stage(lambda s: s.drop_path_rate),
        qkv_bias=per_stage(lambda s: s.qkv_bias),
        cls_token=per_stage(lambda s: s.cls_token),
        qkv_projection_method=per_stage(lambda s: s.qkv_proj_method),
        kernel_qkv=per_stage(lambda s: s.kernel_qkv),
        padding_kv=per_stage(lambda s: s.padding_kv),
        stride_kv=per_stage(lambda s: s.stride_kv),
        padding_q=per_stage(lambda s: s.padding_q),
        stride_q=per_stage(lambda s: s.stride_q),
        layer_norm_eps=mc.ln_eps,
    )


def official_differences(mc) -> tuple[list[str], list[str]]:
    """As hf_differences, for the official microsoft/CvT code: it has no position embedding (ViT-style patches are
    its conv with kernel == stride and no padding), and hard-codes QuickGELU and LayerNorm eps 1e-5."""
    missing = [
        f"model.stages.{i}.pos_embed=true (no position embeddings)" for i, s in enumerate(mc.stages) if s.pos_embed
    ]
    approx = [f"model.act={mc.act} (the official code uses QuickGELU)"] if mc.act != "quick_gelu" else []
    if mc.ln_eps != 1e-5:
        approx.append(f"model.ln_eps={mc.ln_eps} (the official code fixes 1e-5)")
    return missing, approx + head_scaled(mc, "the official code")


def official_spec(mc) -> dict:
    """The MODEL.SPEC block of an official CvT yaml for our model config (official_spec_to_config's inverse, up
    to ViT-style patches, which become the equivalent conv)."""
    patch = [s.embed == "patch" for s in mc.stages]
    spec = {
        "INIT": mc.init,
        "NUM_STAGES": len(mc.stages),
        "PATCH_SIZE": [s.patch_stride if p else s.patch_size for s, p in zip(mc.stages, patch)],
        "PATCH_STRIDE": [s.patch_stride for s in mc.stages],
        "PATCH_PADDING": [0 if p else s.patch_padding for s, p in zip(mc.stages, patch)],
    }
    for key in (
        "dim_embed",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
        "cls_token",
        "qkv_proj_method",
        "kernel_qkv",
        "padding_kv",
        "stride_kv",
        "padding_q",
        "stride_q",
    ):
        spec[key.upper()] = [getattr(s, key) for s in mc.stages]
    return spec
