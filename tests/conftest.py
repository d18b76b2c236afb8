"""Shared helpers: a tiny CvT for fast tests, weight randomisation, the presets built once."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

import cvt_train

# CvT-13's geometry (strides 4/2/2, so 32x32 inputs still work: maps 8, 4, 2) with small widths and depths.
TINY = {
    "num_classes": 10,
    "stages.0.dim_embed": 16,
    "stages.1.dim_embed": 32,
    "stages.2.dim_embed": 48,
    "stages.1.num_heads": 2,
    "stages.2.num_heads": 3,
    "stages.1.depth": 1,
    "stages.2.depth": 2,
}


def tiny_model(**overrides) -> cvt_train.CvT:
    return cvt_train.create_model("cvt13", **{**TINY, **overrides})


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter and set BatchNorm running stats, so that a mixed-up key changes the output."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The presets, built once per session; tests must not change their weights. The bigger two are only counted,
# so they skip trunc_normal_ (slow on CPU: seconds for W24); sizes do not depend on the init.
@pytest.fixture(scope="session")
def cvt13() -> cvt_train.CvT:
    return cvt_train.create_model("cvt13")


@pytest.fixture(scope="session")
def cvt21() -> cvt_train.CvT:
    return cvt_train.create_model("cvt21", init="xavier")


@pytest.fixture(scope="session")
def cvtw24() -> cvt_train.CvT:
    """277M parameters, ~1.1 GB; building on the meta device would be instant once cvt.py allows it."""
    return cvt_train.create_model("cvtw24", init="xavier")


def compose_train(overrides: list[str]):
    """The composed `cvt-train` config for these overrides, as Hydra would build it (nothing runs)."""
    with initialize_config_module("cvt_train.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(autouse=True)
def _ieee_fp32_on_cuda():
    """Tests compare fp32 logits at 1e-5: on a CUDA machine, pin IEEE fp32 before each test (the trainer switches
    TF32 on for its runs, which changes the third decimal)."""
    if torch.cuda.is_available():
        from cvt_train.engine.precision import set_gpu_defaults

        set_gpu_defaults(torch.device("cuda"), tf32=False, benchmark=False)
    yield
