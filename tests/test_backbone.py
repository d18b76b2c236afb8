"""CvT as a backbone: forward_intermediates / prune_intermediate_layers with timm's contract, create_backbone.

The maps are checked against the forward pass itself (hooks on the stages), not against another call of the same
function."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, randomize, tiny_model

import cvt_train
from cvt_train.models.cvt import create_backbone, map_to_tokens


def stage_outputs(model, x) -> list[torch.Tensor]:
    """Each stage's map as the plain forward computes it (hooks), and the logits."""
    maps = []
    hooks = [s.register_forward_hook(lambda m, i, o: maps.append(o[0])) for s in model.stages]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return maps, logits


@pytest.mark.parametrize(
    "name,size,shapes",
    [
        ("cvt13", 224, [(64, 56, 56), (192, 28, 28), (384, 14, 14)]),
        ("cvt13", 384, [(64, 96, 96), (192, 48, 48), (384, 24, 24)]),
        ("cvt_cifar_tiny", 32, [(32, 16, 16), (64, 8, 8), (128, 4, 4)]),
    ],
)
def test_stage_maps_have_the_documented_shapes_and_equal_the_forward_pass(name, size, shapes):
    model = cvt_train.create_model(name, init="xavier").eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
    assert [tuple(m.shape[1:]) for m in maps] == shapes
    assert [(i["num_chs"], size // i["reduction"]) for i in model.feature_info] == [(c, h) for c, h, _ in shapes]
    expected, logits = stage_outputs(model, x)
    for got, want in zip(maps, expected):
        assert torch.equal(got, want)
    assert torch.equal(model.head(final), logits)  # final = forward_features(x), what the head classifies


def test_indices_norm_formats_and_early_stop_follow_timms_contract():
    model = randomize(tiny_model()).eval()
    x = torch.randn(2, 3, 64, 64)
    expected, _ = stage_outputs(model, x)
    with torch.no_grad():
        assert [m.shape[1] for m in model.forward_intermediates(x, indices=2, intermediates_only=True)] == [32, 48]
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert torch.equal(picked[0], expected[0]) and torch.equal(picked[1], expected[2])
        nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert all(torch.equal(a, map_to_tokens(b)) for a, b in zip(nlc, expected))  # (B, H*W, C), no cls token
        normed = model.forward_intermediates(x, indices=[1, 2], norm=True, intermediates_only=True)
        assert torch.equal(normed[0], expected[1])  # the final norm has the last stage's width only
        torch.testing.assert_close(map_to_tokens(normed[1]), model.norm(map_to_tokens(expected[2])))

        ran = []
        hook = model.stages[2].register_forward_hook(lambda *a: ran.append(True))
        final, maps = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert not ran and torch.equal(final, expected[1]) and torch.equal(maps[0], expected[1])
        model.forward_intermediates(x, indices=[1])
        assert ran  # without stop_early every stage runs
        hook.remove()
    for bad in ([3], [-4], 0, 4, []):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)


def test_prune_drops_later_stages_head_and_norm_and_keeps_the_maps():
    model = randomize(tiny_model()).eval()
    x = torch.randn(2, 3, 32, 32)
    expected, _ = stage_outputs(model, x)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(model.stages) == 2 and isinstance(model.head, torch.nn.Identity)
    assert isinstance(model.norm, torch.nn.Identity)  # the final norm had stage 2's width
    assert not any(k.startswith(("stages.2.", "head.", "norm.")) for k in model.state_dict())
    assert [i["num_chs"] for i in model.feature_info] == [16, 32] and model.num_features == 32
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected[:2]))


def test_create_backbone_loads_weights_and_returns_the_selected_maps(tmp_path):
    full = randomize(tiny_model()).eval()
    torch.save({"model": full.state_dict()}, tmp_path / "w.pt")
    backbone = create_backbone(
        "cvt13",
        out_indices=(1, 2),
        checkpoint=tmp_path / "w.pt",
        num_classes=3,
        **{k: v for k, v in TINY.items() if k != "num_classes"},
    )
    x = torch.randn(2, 3, 64, 96)  # any size the strides allow, not square
    expected, _ = stage_outputs(full, x)
    with torch.no_grad():
        maps = backbone.eval()(x)
    assert len(maps) == 2 and torch.equal(maps[0], expected[1]) and torch.equal(maps[1], expected[2])
    assert [(i["num_chs"], i["reduction"]) for i in backbone.feature_info] == [(32, 8), (48, 16)]
    assert [tuple(m.shape[-2:]) for m in maps] == [(64 // 8, 96 // 8), (64 // 16, 96 // 16)]


@pytest.mark.slow
def test_backbone_compiles():
    backbone = create_backbone("cvt_cifar_tiny", out_indices=(0, 1, 2)).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(backbone)
    with torch.no_grad():
        for got, want in zip(compiled(x), backbone(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
