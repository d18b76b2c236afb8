"""cvt-export: every format is read back by its consumer and gives our logits (fp32 on CPU; TF32 is pinned off on
CUDA by conftest). The HF folder is loaded by transformers itself, the official file by our loader from the
MODEL.SPEC written beside it, the ONNX file by onnxruntime at batch sizes other than the traced one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize, tiny_model
from fakedata import CLASSES, write_cifar10_python
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import cvt_train
from cvt_train import UserError, load_checkpoint
from cvt_train.engine.trainer import train
from cvt_train.eval import load_model
from cvt_train.export import export_official, export_onnx, export_safetensors, load_safetensors, model_card
from cvt_train.models.convert import detect_format, hf_config, read_file

transformers = pytest.importorskip("transformers")

# cvt_cifar_tiny with exact GELU and depth 3 in stage 2 (HF's port needs depth > stage index)
FAST = [
    "model=cvt_cifar_tiny",
    "model.stages.2.depth=3",
    "model.act=gelu",
    "trainer.device=cpu",
    "trainer.progress=false",
    "data.num_workers=0",
    "data.batch_size=50",
    "sched.warmup_epochs=0",
    "trainer.precision=fp32",
    "trainer.epochs=1",
    "trainer.max_steps_per_epoch=3",
    "data.train_subset=150",
    "trainer.ema.enabled=true",
]


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cvt_train.export", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=150, n_test=40)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, cifar_root) -> Path:
    """A few steps of cvt-train (act=gelu, EMA on): last.pt, with metrics.json beside it."""
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_module("cvt_train.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, "data=cifar10", f"data.root={cifar_root}"])
    train(cfg, run_dir)
    return run_dir / "last.pt"


def test_checkpoint_of_cvt_train_exports_to_hf_with_our_logits(ckpt, cifar_root, tmp_path):
    out = tmp_path / "hf"
    result = result_of(cli([f"ckpt={ckpt}", "format=hf", f"out={out}", f"data.root={cifar_root}"], tmp_path))
    assert result["max_abs_logit_diff"] <= 1e-5 and result["approximations"] == []
    assert result["checked_on"] == "8 validation images"
    hf, info = transformers.CvtForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key, no error
    assert [hf.config.id2label[i] for i in range(10)] == CLASSES  # the data's class names
    assert read_file(ckpt)["classes"] == CLASSES  # stored by the trainer: id2label needs no data at export time
    ours = load_model(ckpt)
    for batch in (3, 1):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(hf.eval()(pixel_values=x).logits, ours(x), rtol=0, atol=1e-5)
    card = (out / "README.md").read_text()
    metrics = json.loads((ckpt.parent / "metrics.json").read_text())
    assert f"{cvt_train.models.num_params(ours):,}" in card and "GMACs" in card
    top1 = f"{metrics['top1']:.4f}".rstrip("0").rstrip(".")
    assert "cifar10" in card and "optim.name" in card and f"| top1 | {top1} |" in card
    assert "weights: raw" in card


def test_ema_switch_exports_the_ema_weights(ckpt, tmp_path):
    out = tmp_path / "ema"
    result_of(cli([f"ckpt={ckpt}", "format=safetensors", f"out={out}", "ema=true"], tmp_path))
    exported = load_safetensors(out / "cvt_cifar_tiny.safetensors")
    ema = load_model(ckpt, use_ema=True)
    for k, v in ema.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k
    assert not torch.equal(ema.head.weight, load_model(ckpt).head.weight)  # the switch mattered


def test_quick_gelu_is_refused_in_one_line_then_exported_approximately(ckpt, cifar_root, tmp_path):
    obj = read_file(ckpt)
    obj["config"]["model"]["act"] = "quick_gelu"  # the same weights, trained (so to say) with QuickGELU
    qg = tmp_path / "quick_gelu.pt"
    torch.save(obj, qg)
    args = [f"ckpt={qg}", "format=hf", f"out={tmp_path / 'hf'}", f"data.root={cifar_root}"]
    one_error_line(cli(args, tmp_path), "model.act=quick_gelu", "allow_approx=true")
    assert not (tmp_path / "hf").exists()
    result = result_of(cli([*args, "allow_approx=true"], tmp_path))
    assert result["approximations"] == ["model.act=quick_gelu (HF uses exact GELU)"]
    assert 1e-6 < result["max_abs_logit_diff"] < 1.0  # GELU vs QuickGELU: measurably, not wildly, different
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Approximate export" in card and "on 8 validation images" in card
    assert f"max abs difference {result['max_abs_logit_diff']:.3g}" in card


def test_models_hf_cannot_build_are_refused_naming_the_key():
    for overrides, key in (
        ({"stages.1.pos_embed": True}, "model.stages.1.pos_embed=true"),
        ({"stages.0.qkv_proj_method": "linear"}, "model.stages.0.qkv_proj_method=linear"),
        ({"stages.1.depth": 1}, "model.stages.1.depth=1"),
        ({"stages.2.cls_token": False}, "model.stages.2.cls_token=false"),
    ):
        mc = tiny_model(act="gelu", **{"stages.1.depth": 2, "stages.2.depth": 3, **overrides}).cfg
        with pytest.raises(UserError, match="HF's CvT has no") as e:
            hf_config(mc, allow_approx=True)
        assert key in str(e.value) and "\n" not in str(e.value)
    mc = tiny_model(ln_eps=1e-6, **{"stages.1.depth": 2, "stages.2.depth": 3}).cfg
    with pytest.raises(UserError, match="model.act=quick_gelu .*model.ln_eps=1e-06"):
        hf_config(mc)
    assert hf_config(mc, allow_approx=True).embed_dim == [16, 32, 48]


def test_model_card_names_a_head_width_attention_scale():
    card = model_card(tiny_model(**{"stages.1.attn_scale": "head"}), {})
    rows = [line for line in card.splitlines() if line.startswith(("| 0 |", "| 1 |", "| 2 |"))]
    assert ["head width" in row for row in rows] == [False, True, False]


def test_official_export_round_trips_through_its_spec_exactly(tmp_path):
    model = randomize(tiny_model(**{"stages.0.embed": "patch", "stages.0.patch_stride": 4})).eval()
    result = export_official(model, tmp_path / "cvt.pth")
    spec = OmegaConf.load(tmp_path / "cvt.yaml").MODEL.SPEC
    assert spec.PATCH_SIZE[0] == 4 and spec.PATCH_PADDING[0] == 0  # ViT-style patches as the official conv
    sd = torch.load(tmp_path / "cvt.pth", weights_only=True)
    assert detect_format(sd) == "official" and "stage0.patch_embed.proj.weight" in sd
    back = cvt_train.from_official_spec(spec, num_classes=10)
    assert load_checkpoint(back, tmp_path / "cvt.pth") == "official"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))
    assert result["max_abs_logit_diff"] == 0.0


def test_official_refuses_what_the_official_code_lacks(tmp_path):
    with pytest.raises(UserError, match=r"model.stages.0.pos_embed=true"):
        export_official(tiny_model(**{"stages.0.pos_embed": True}), tmp_path / "a.pth")
    with pytest.raises(UserError, match=r"model.act=gelu .*allow_approx=true"):
        export_official(tiny_model(act="gelu"), tmp_path / "b.pth")
    assert not list(tmp_path.iterdir())


def test_safetensors_keeps_any_variant_and_loads_with_load_checkpoint(tmp_path):
    # position embeddings, average pooling, a cls token in stage 1: nothing HF or the official code can build
    model = randomize(
        tiny_model(
            **{"stages.0.pos_embed": True, "stages.1.qkv_proj_method": "avg", "stages.1.cls_token": True, "act": "gelu"}
        )
    ).eval()
    path = tmp_path / "m.safetensors"
    result = export_safetensors(model, path)
    fresh = tiny_model(
        **{"stages.0.pos_embed": True, "stages.1.qkv_proj_method": "avg", "stages.1.cls_token": True, "act": "gelu"}
    )
    assert load_checkpoint(fresh, path) == "own"
    rebuilt = load_safetensors(path)
    assert rebuilt.cfg == model.cfg and cvt_train.load_model(path).cfg == model.cfg  # load_model takes it too
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x)) and torch.equal(rebuilt(x), model(x))
    assert result["max_abs_logit_diff"] == 0.0


def test_onnx_matches_pytorch_at_two_batch_sizes(tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (the export extra)")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime: pip install 'cvt-train[export]'")
    model = randomize(tiny_model()).eval()  # QuickGELU, cls token in the last stage
    images = torch.randn(3, 3, 32, 32)
    result = export_onnx(model, tmp_path / "m.onnx", image_size=32, images=images)
    assert result["max_abs_logit_diff"] <= 1e-4 and isinstance(result["opset"], int) and result["opset"] >= 18
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # neither is the traced batch (2): the batch dimension is dynamic
        x = torch.randn(batch, 3, 32, 32)
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            assert (torch.from_numpy(logits) - model(x)).abs().max() <= 1e-4


def test_bad_input_gives_one_error_line(tmp_path):
    one_error_line(cli(["ckpt=missing.pt", "format=hf", f"out={tmp_path}"], tmp_path), "missing.pt", "not found")
    one_error_line(
        cli(["ckpt=x.pt", "format=tflite", f"out={tmp_path}"], tmp_path),
        "format='tflite': unknown format; choose one of hf,",
    )
    sd = tmp_path / "weights.pt"
    torch.save(tiny_model().state_dict(), sd)
    one_error_line(cli([f"ckpt={sd}", "format=onnx", f"out={tmp_path}"], tmp_path), "model=cvt13")


def test_onnx_of_a_trained_checkpoint_on_its_validation_images(ckpt, cifar_root, tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (the export extra)")
    pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime (the export extra)")
    result = result_of(cli([f"ckpt={ckpt}", "format=onnx", f"out={tmp_path}", f"data.root={cifar_root}"], tmp_path))
    assert result["max_abs_logit_diff"] <= 1e-4 and result["input"] == [None, 3, 32, 32]
    assert result["checked_on"] == "8 validation images, batch sizes 8 and 1"
    assert (tmp_path / "cvt_cifar_tiny.onnx").is_file()
