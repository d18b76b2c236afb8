"""The experiment recipes: the ImageNet ones hold the official CvT hyper-parameters, the CIFAR ones build and run.

Official values: microsoft/CvT experiments/imagenet/cvt/cvt-{13,21}-224x224.yaml and lib/config/default.py
(TRAIN.LR 0.00025 with BATCH_SIZE_PER_GPU 256, multiplied by the world size since TRAIN.SCALE_LR defaults to true).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_train
from fakedata import write_cifar10_python
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from cvt_train.engine.optim import learning_rate
from cvt_train.engine.trainer import train
from cvt_train.models import CvT, model_config, stage_map_sizes

OFFICIAL_RECIPE = {  # the official training recipe, shared by CvT-13, CvT-21 and W24
    "optim.name": "adamw",
    "optim.weight_decay": 0.05,
    "optim.betas": [0.9, 0.999],
    "sched.name": "cosine",
    "sched.warmup_epochs": 5,
    "sched.warmup_lr": 1e-6,
    "sched.min_lr": 1e-5,
    "trainer.epochs": 300,
    "aug.crop": "random_resized",
    "aug.crop_scale": [0.08, 1.0],
    "aug.crop_ratio": [3 / 4, 4 / 3],
    "aug.hflip": 0.5,
    "aug.auto_augment": "randaugment",
    "aug.randaugment_num_ops": 2,
    "aug.randaugment_magnitude": 9,
    "aug.randaugment_bins": 11,  # m9 on timm's 0..10 scale
    "aug.randaugment_magnitude_std": 0.5,
    "aug.randaugment_op_prob": 0.5,  # mstd0.5; timm's per-op probability
    "aug.mixup_alpha": 0.8,
    "aug.cutmix_alpha": 1.0,
    "aug.mix_prob": 1.0,
    "aug.mix_switch_prob": 0.5,
    "aug.random_erasing": 0.25,
    "aug.label_smoothing": 0.1,
    "aug.interpolation": "bicubic",
    "aug.eval_crop_ratio": 0.875,  # TEST.CENTER_CROP: resize 256, crop 224
    "data.name": "imagenet",
    "data.num_classes": 1000,
    "data.mean": [0.485, 0.456, 0.406],
    "data.std": [0.229, 0.224, 0.225],
}
OFFICIAL_SPEC = {  # MODEL.SPEC per stage (paper Table 2)
    "cvt13": {
        "dim_embed": [64, 192, 384],
        "num_heads": [1, 3, 6],
        "depth": [1, 2, 10],
        "drop_path_rate": [0.0, 0.0, 0.1],
    },
    "cvt21": {
        "dim_embed": [64, 192, 384],
        "num_heads": [1, 3, 6],
        "depth": [1, 4, 16],
        "drop_path_rate": [0.0, 0.0, 0.1],
    },
    "cvtw24": {
        "dim_embed": [192, 768, 1024],
        "num_heads": [3, 12, 16],
        "depth": [2, 2, 20],
        "drop_path_rate": [0.0, 0.0, 0.3],
    },
}
COMMON_SPEC = {
    "patch_size": [7, 3, 3],
    "patch_stride": [4, 2, 2],
    "patch_padding": [2, 1, 1],
    "mlp_ratio": [4.0] * 3,
    "qkv_bias": [True] * 3,
    "cls_token": [False, False, True],
    "pos_embed": [False] * 3,
    "qkv_proj_method": ["dw_bn"] * 3,
    "kernel_qkv": [3] * 3,
    "padding_q": [1] * 3,
    "padding_kv": [1] * 3,
    "stride_q": [1] * 3,
    "stride_kv": [2] * 3,
    "drop_rate": [0.0] * 3,
    "attn_drop_rate": [0.0] * 3,
}


@pytest.mark.parametrize(
    "experiment,model,size,batch",
    [
        ("imagenet_cvt13", "cvt13", 224, 256),
        ("imagenet_cvt21", "cvt21", 224, 256),
        ("imagenet_cvtw24_384", "cvtw24", 384, 32),
    ],
)
def test_imagenet_recipes_hold_the_official_values(experiment, model, size, batch):
    cfg = compose_train([f"experiment={experiment}"])
    for key, value in OFFICIAL_RECIPE.items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == pytest.approx(value) if not isinstance(value, str) else got == value, key
    # AdamW 2.5e-4 per 256 images: 2e-3 on the official 8 GPUs x 256, 2.5e-4 on one GPU
    assert cfg.optim.lr is None and cfg.optim.base_lr == 2.5e-4 and cfg.optim.base_batch_size == 256
    assert learning_rate(cfg.optim, 8 * 256) == pytest.approx(2e-3)
    assert learning_rate(cfg.optim, 256) == pytest.approx(2.5e-4)
    assert cfg.trainer.precision in ("bf16", "fp16")  # AMP
    assert cfg.data.image_size == size and cfg.data.batch_size == batch

    mc = model_config(cfg.model)
    assert mc.name == model and mc.act == "quick_gelu" and mc.ln_eps == 1e-5 and mc.num_classes == 1000
    spec = {**COMMON_SPEC, **OFFICIAL_SPEC[model]}
    for key, values in spec.items():
        assert [getattr(s, key) for s in mc.stages] == values, key
    assert stage_map_sizes(mc, (size, size)) == [(size // 4,) * 2, (size // 8,) * 2, (size // 16,) * 2]


@pytest.mark.parametrize("experiment", ["cifar10_cvt", "cifar10_cpu"])
def test_cifar_recipes_build_for_32px_and_run(experiment, tmp_path_factory):
    cfg = compose_train([f"experiment={experiment}"])
    assert cfg.data.name == "cifar10" and cfg.data.image_size == 32
    model = CvT(model_config(cfg.model)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    sizes = stage_map_sizes(model_config(cfg.model), (32, 32))
    assert sizes[-1][0] >= 4  # the last stage still sees a map, not a single token

    # a few steps of the recipe as it stands (augmentation, mixing, EMA, schedule) on generated CIFAR pickles
    root = write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=16)
    run_dir = tmp_path_factory.mktemp("run")
    small = [
        f"experiment={experiment}",
        f"data.root={root}",
        "data.val_split=0",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.train_subset=16",
        "trainer.epochs=1",
        "trainer.time_budget_min=null",  # (cifar10_cpu plans by time: tests/test_budget.py)
        "trainer.progress=false",
        "trainer.max_steps_per_epoch=2",
    ]
    train(compose_train(small), run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["images"] == 16 and 0.0 <= metrics["top1"] <= 100.0


def test_time_budgeted_recipes():
    cpu = compose_train(["experiment=cifar10_cpu"])
    assert cpu.trainer.time_budget_min == 28 and cpu.trainer.resize.min_size == 16  # 28: see the file's header
    fast, full = compose_train(["experiment=cifar10_cvt_fast"]), compose_train(["experiment=cifar10_cvt"])
    assert fast.trainer.time_budget_min == 10 and fast.trainer.compile and fast.data.batch_size == 256
    assert fast.model == full.model and fast.aug == full.aug  # cifar10_cvt's model and augmentation, against the clock


def test_cifar10_zoo_is_the_zoo_recipe(tmp_path_factory):
    """pprp/PyTorch-CIFAR-Model-Hub's CvT and training (lib/config/default.yaml): SGD 0.1, momentum 0.9, no
    Nesterov, weight decay 5e-4, batch 128, 200 epochs, x0.2 at 60/120/160, pad-4 crop + flip only."""
    cfg = compose_train(["experiment=cifar10_zoo"])
    o, s, a = cfg.optim, cfg.sched, cfg.aug
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.1, 0.9, False, 5e-4)
    assert (s.name, list(s.milestones), s.gamma, s.warmup_epochs) == ("multistep", [60, 120, 160], 0.2, 0)
    assert (cfg.data.batch_size, cfg.trainer.epochs, a.crop, a.crop_padding, a.hflip) == (128, 200, "pad_crop", 4, 0.5)
    assert a.auto_augment is None and a.mixup_alpha == a.cutmix_alpha == a.random_erasing == a.label_smoothing == 0
    mc = model_config(cfg.model)
    assert [s.dim_embed for s in mc.stages] == [64, 192, 384] and [s.depth for s in mc.stages] == [1, 2, 10]
    assert [s.num_heads for s in mc.stages] == [1, 3, 6] and [s.patch_stride for s in mc.stages] == [4, 2, 2]
    assert not any(s.qkv_bias or s.cls_token for s in mc.stages) and mc.act == "gelu"
    assert stage_map_sizes(mc, (32, 32)) == [(8, 8), (4, 4), (2, 2)]
    root = write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=32, n_test=8)
    small = ["experiment=cifar10_zoo", f"data.root={root}", "data.batch_size=8", "data.num_workers=0"]
    small += ["data.train_subset=16", "trainer.epochs=1", "trainer.progress=false", "trainer.max_steps_per_epoch=2"]
    train(compose_train(small), tmp_path_factory.mktemp("run"))


def test_cifar10_cvt_is_a_full_gpu_recipe():
    cfg = compose_train(["experiment=cifar10_cvt"])
    assert cfg.trainer.epochs >= 200 and cfg.trainer.ema.enabled
    assert cfg.aug.auto_augment in ("randaugment", "trivialaugment")
    assert cfg.aug.mixup_alpha > 0 and cfg.aug.cutmix_alpha > 0 and cfg.aug.random_erasing > 0
    assert cfg.aug.label_smoothing > 0 and max(s.drop_path_rate for s in cfg.model.stages) > 0
    assert cfg.optim.name == "adamw" and 128 <= cfg.data.batch_size <= 256


def sweep_variants(experiment: str) -> list[list[str]]:
    """The jobs an experiment's `hydra.sweeper.params` expand to, as override lists (Hydra's own parser)."""
    from itertools import product

    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_module("cvt_train.conf", version_base="1.3"):
        params = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True).hydra.sweeper.params
    parser = OverridesParser.create()
    axes = [
        [f"{key}={v}" for v in parser.parse_override(f"{key}={value}").sweep_string_iterator()]
        for key, value in params.items()
    ]
    return [list(job) for job in product(*axes)]


ABLATIONS = {"pos_embed": 3, "embed": 4, "kv_stride": 2, "conv_proj": 4, "noise": 3}


@pytest.mark.parametrize("name,jobs", ABLATIONS.items())
def test_ablation_sweeps_build_one_distinct_model_per_job(name, jobs):
    from cvt_train import count_macs

    variants = sweep_variants(f"ablation_{name}")
    assert len(variants) == jobs
    configs, macs = [], []
    for overrides in variants:
        cfg = compose_train([f"experiment=ablation_{name}", *overrides])
        mc = model_config(cfg.model)
        model = CvT(mc)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        configs.append((OmegaConf.to_yaml(cfg.model, resolve=True), cfg.trainer.seed))
        macs.append(count_macs(model, (3, 32, 32)))
    assert len(set(configs)) == jobs  # every job trains something else
    if name == "kv_stride":  # paper Table 7: k/v stride 2 saves about a quarter of the FLOPs
        (stride1,), (stride2,) = ([m for v, m in zip(variants, macs) if f"[{s},{s},{s}]" in v[0]] for s in (1, 2))
        assert 0.2 < 1 - stride2 / stride1 < 0.3


def test_quickstart_trains_and_evaluates_offline(tmp_path):
    """The README's first command, as a user runs it: the embedded digits, far above chance, and cvt-eval of
    best.pt gives the best validation top-1 the run reported."""
    import subprocess
    import sys

    def cli(module, *args):
        return subprocess.run(
            [sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True, timeout=900
        )

    trained = cli("cvt_train.train", "experiment=quickstart", "trainer.progress=false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = tmp_path / "outputs" / "quickstart"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_top1"] > 90 and metrics["epoch"] == 15  # 10 classes: chance is 10%
    evaluated = cli("cvt_train.eval", f"ckpt={run / 'best.pt'}", "eval.progress=false")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["top1"] == metrics["best_top1"]
