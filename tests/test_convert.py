"""Weights from elsewhere: HF transformers' CvT (an independent implementation), official state dicts, our own."""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import torch
from conftest import randomize, tiny_model

import cvt_train
from cvt_train import UserError, load_checkpoint
from cvt_train.models.convert import to_format

try:  # the HF tests need it (the `test` extra installs it); the official / own-format tests below do not
    import transformers
except ImportError:
    transformers = None


def ours_like(c) -> cvt_train.CvT:
    """Our model for an HF CvtConfig, key by key (written here, independently of the library's presets)."""
    stages = [
        dict(
            patch_size=c.patch_sizes[i],
            patch_stride=c.patch_stride[i],
            patch_padding=c.patch_padding[i],
            dim_embed=c.embed_dim[i],
            depth=c.depth[i],
            num_heads=c.num_heads[i],
            mlp_ratio=float(c.mlp_ratio[i]),
            qkv_bias=c.qkv_bias[i],
            cls_token=c.cls_token[i],
            qkv_proj_method=c.qkv_projection_method[i],
            kernel_qkv=c.kernel_qkv[i],
            padding_q=c.padding_q[i],
            padding_kv=c.padding_kv[i],
            stride_q=c.stride_q[i],
            stride_kv=c.stride_kv[i],
        )
        for i in range(len(c.depth))
    ]
    return cvt_train.create_model({"num_classes": c.num_labels, "act": "gelu", "stages": stages})


# Other widths, depths (>= stage index + 1: HF's drop-path slip), kernels, strides, mlp ratios, qkv biases.
SMALL = dict(
    num_labels=7,
    embed_dim=[16, 32, 48],
    num_heads=[1, 2, 3],
    depth=[1, 2, 3],
    patch_sizes=[5, 3, 3],
    patch_stride=[2, 2, 1],
    patch_padding=[2, 1, 1],
    stride_kv=[2, 1, 2],
    kernel_qkv=[3, 5, 3],
    padding_q=[1, 2, 1],
    padding_kv=[1, 2, 1],
    mlp_ratio=[4.0, 2.0, 3.0],
    qkv_bias=[True, False, True],
    cls_token=[False, False, True],
    drop_path_rate=[0.0, 0.1, 0.2],
)
CONFIGS = {"cvt13": dict(num_labels=1000), "small": SMALL, "small_no_cls": {**SMALL, "cls_token": [False] * 3}}


def hf_logits(model, x):
    if model.config.cls_token[-1]:
        return model(pixel_values=x).logits
    # HF's classifier cannot run without a cls token (it reads outputs[1], which ModelOutput drops when None);
    # its encoder can: the same head by hand, LayerNorm on every token, then the mean.
    tokens = model.cvt(pixel_values=x).last_hidden_state.flatten(2).transpose(1, 2)
    return model.classifier(model.layernorm(tokens).mean(dim=1))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """hf(name): a random HF CvT (BatchNorm stats and affine params randomised), its save_pretrained folder,
    inputs of batch size 3 and 1 and their logits; each built once per module."""
    pytest.importorskip("transformers")
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = transformers.CvtForImageClassification(transformers.CvtConfig(**CONFIGS[name]))
            randomize(model).eval()
            folder = tmp_path_factory.mktemp(f"hf_{name}")
            model.save_pretrained(folder)
            size = 96 if name == "cvt13" else 64  # 96: CvT-13 maps 24, 12, 6 (k/v 12, 6, 3), a fifth of 224's cost
            inputs = [torch.randn(3, 3, size, size), torch.randn(1, 3, size, size)]
            with torch.no_grad():
                cache[name] = model, folder, inputs, [hf_logits(model, x) for x in inputs]
        return cache[name]

    return get


def fresh_cvt13(**overrides) -> cvt_train.CvT:
    """A CvT-13 to load weights into: Xavier's uniform_ is much faster than trunc_normal_ and every weight is
    overwritten by the (strict) load anyway."""
    return cvt_train.create_model("cvt13", init="xavier", **overrides)


def assert_same_logits(ours, inputs, logits):
    ours.eval()
    with torch.no_grad():
        for x, expected in zip(inputs, logits):
            out = ours(x)
            assert out.shape == expected.shape
            assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", CONFIGS.keys())
def test_hf_save_pretrained_folder(hf, name):
    model, folder, inputs, logits = hf(name)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    # our CvT-13 preset must be HF's default config; the small ones are built key by key
    ours = fresh_cvt13(act="gelu") if name == "cvt13" else ours_like(model.config)
    assert set(to_format(ours.state_dict(), "hf")) == set(model.state_dict())
    assert load_checkpoint(ours, folder) == "hf"
    assert_same_logits(ours, inputs, logits)


@pytest.mark.parametrize("source", ["pytorch_model.bin", "state_dict"])
def test_hf_other_sources(hf, source, tmp_path):
    model, folder, inputs, logits = hf("small")
    if source == "state_dict":
        src = model.state_dict()
    else:  # what save_pretrained(safe_serialization=False) wrote before transformers 5
        src = tmp_path
        shutil.copy(folder / "config.json", tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    ours = ours_like(model.config)
    assert load_checkpoint(ours, src) == "hf"
    assert_same_logits(ours, inputs, logits)


def test_hf_head_for_other_class_count(hf):
    model = hf("small")[0]
    ours = ours_like(transformers.CvtConfig(**{**SMALL, "num_labels": 5}))
    with pytest.raises(UserError, match="drop_head"):
        load_checkpoint(ours, model.state_dict())
    load_checkpoint(ours, model.state_dict(), drop_head=True)
    assert torch.equal(ours.norm.weight, model.layernorm.weight)
    features_only = ours_like(transformers.CvtConfig(**{**SMALL, "num_labels": 0}))  # no head at all
    with pytest.raises(UserError, match="classifier.weight"):
        load_checkpoint(features_only, model.state_dict())
    load_checkpoint(features_only, model.state_dict(), drop_head=True)


def test_hf_backbone_state_dict(hf):
    """HF's bare CvtModel (keys `encoder.stages...`): every stage weight loads; its lack of the final LayerNorm
    and classifier is reported by a strict load."""
    model = hf("small")[0]
    backbone = model.cvt.state_dict()
    assert next(iter(backbone)).startswith("encoder.stages.")
    ours = ours_like(transformers.CvtConfig(**{**SMALL, "num_labels": 0}))
    with pytest.raises(UserError, match=r"2 missing key\(s\) \['norm.weight', 'norm.bias'\], 0 unexpected"):
        load_checkpoint(ours, backbone)
    assert load_checkpoint(ours, backbone, strict=False) == "hf"
    ref = to_format(ours.state_dict(), "hf")
    for key, value in model.state_dict().items():
        if key.startswith("cvt."):
            assert torch.equal(ref[key], value), key


# ---- the official microsoft/CvT format, made by our converter from our own weights ----


@pytest.fixture(scope="module")
def cvt13_random(cvt13):
    torch.manual_seed(1)
    model = randomize(copy.deepcopy(cvt13), seed=1).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return model.state_dict(), x, model(x)


def official_sd(cvt13_random):
    return to_format(cvt13_random[0], "official")


def test_official_key_names(cvt13_random):
    sd = official_sd(cvt13_random)
    for key in [
        "stage0.patch_embed.proj.weight",
        "stage0.patch_embed.norm.bias",
        "stage2.cls_token",
        "stage1.blocks.0.norm1.weight",
        "stage1.blocks.0.attn.conv_proj_q.conv.weight",
        "stage1.blocks.0.attn.conv_proj_k.bn.running_var",
        "stage1.blocks.0.attn.proj_v.bias",
        "stage1.blocks.0.attn.proj.weight",
        "stage1.blocks.0.mlp.fc1.weight",
        "norm.weight",
        "head.bias",
    ]:
        assert key in sd
    assert all(re.match(r"(stage[0-2]\.|norm\.|head\.)", k) for k in sd)


WRAPPERS = {
    "plain": lambda sd: sd,
    "module": lambda sd: {f"module.{k}": v for k, v in sd.items()},  # saved from DistributedDataParallel
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 300},
    "model": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
def test_official_file_round_trip(cvt13_random, wrap, tmp_path):
    _, x, expected = cvt13_random
    path = tmp_path / "CvT-13-224x224-IN-1k.pth"
    torch.save(wrap(official_sd(cvt13_random)), path)
    model = fresh_cvt13()
    assert load_checkpoint(model, path) == "official"  # strict: no missing, no unexpected keys
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)


def test_official_unknown_and_missing_keys(cvt13_random):
    _, x, expected = cvt13_random
    extra = {**official_sd(cvt13_random), "stage2.blocks.0.attn.rel_pos": torch.zeros(3)}
    model = fresh_cvt13()
    with pytest.raises(UserError, match=r"1 unexpected key\(s\) \['stage2\.blocks\.0\.attn\.rel_pos'\]"):
        load_checkpoint(model, extra)
    load_checkpoint(model, extra, strict=False)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)

    partial = official_sd(cvt13_random)
    del partial["stage1.blocks.1.mlp.fc1.bias"]
    with pytest.raises(UserError, match=r"1 missing key\(s\) .*blocks\.1\.mlp\.fc1\.bias"):
        load_checkpoint(model, partial)
    load_checkpoint(model, partial, strict=False)


def test_official_head_for_other_class_count(cvt13_random):
    sd = official_sd(cvt13_random)
    model = fresh_cvt13(num_classes=10)
    head = model.head.weight.detach().clone()
    with pytest.raises(UserError, match="head.weight.*drop_head=True"):
        load_checkpoint(model, sd)
    load_checkpoint(model, sd, drop_head=True)
    assert torch.equal(model.head.weight, head)  # fresh head kept
    assert torch.equal(model.stages[2].cls_token, sd["stage2.cls_token"])
    assert torch.equal(model.norm.weight, sd["norm.weight"])


# ---- our own checkpoints ----


def test_own_checkpoint_formats(tmp_path):
    src = randomize(tiny_model(), seed=2).eval()
    sd = src.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = src(x)
    torch.save({"model": sd, "ema": {k: v + 1 for k, v in sd.items()}, "epoch": 3}, tmp_path / "last.pt")
    for source in [sd, {f"_orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "last.pt"]:
        model = tiny_model()
        assert load_checkpoint(model, source) == "own"
        with torch.no_grad():
            assert torch.equal(model.eval()(x), expected)
    model = tiny_model()
    load_checkpoint(model, tmp_path / "last.pt", use_ema=True)
    assert torch.equal(model.norm.weight, sd["norm.weight"] + 1)


def test_unreadable_files(tmp_path):
    model = tiny_model()
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(model, tmp_path / "missing.pth")
    (tmp_path / "empty.pth").touch()
    with pytest.raises(UserError, match="empty"):
        load_checkpoint(model, tmp_path / "empty.pth")
    with pytest.raises(UserError, match="model.safetensors"):
        load_checkpoint(model, tmp_path)  # a folder without weights
    torch.save({"model": model.state_dict(), "cfg": object()}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(model, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match="no EMA"):
        load_checkpoint(model, model.state_dict(), use_ema=True)
