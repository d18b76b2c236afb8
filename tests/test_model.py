"""The model: exact sizes, every variant switch, validation, init, weight decay groups, official specs."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import num_params, randomize, tiny_model
from omegaconf import OmegaConf
from torch import nn

import cvt_train
from cvt_train import UserError
from cvt_train.models.convert import hf_differences, official_differences

# Paper Table 2 / the official code's models.
PARAMS = {"cvt13": 19_997_480, "cvt21": 31_622_696, "cvtw24": 277_196_392}


@pytest.mark.parametrize("name", ["cvt13", "cvt21", "cvtw24"])
def test_parameter_counts(name, request):
    model = request.getfixturevalue(name)
    assert model.head.out_features == 1000
    assert num_params(model) == PARAMS[name]


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = tiny_model()
    assert next(model.parameters()).is_meta


def forward(model, size, batch=2):
    return model(torch.randn(batch, 3, size, size))


VARIANTS = {
    "default": {},
    "patch_embed": {f"stages.{i}.embed": "patch" for i in range(3)},
    "avg": {f"stages.{i}.qkv_proj_method": "avg" for i in range(3)},
    "linear": {f"stages.{i}.qkv_proj_method": "linear" for i in range(3)},
    "mixed_proj": {"stages.0.qkv_proj_method": "linear", "stages.1.qkv_proj_method": "avg"},
    "stride_kv_1": {f"stages.{i}.stride_kv": 1 for i in range(3)},
    "kernel_qkv_5": {"stages.1.kernel_qkv": 5, "stages.1.padding_q": 2, "stages.1.padding_kv": 2},
    "no_cls_token": {"stages.2.cls_token": False},
    "cls_token_every_stage": {f"stages.{i}.cls_token": True for i in range(3)},  # earlier stages' are dropped
    "drops": {f"stages.{i}.{k}": 0.1 for i in range(3) for k in ("drop_rate", "attn_drop_rate", "drop_path_rate")},
    "embed_geometry": {"stages.0.patch_size": 5, "stages.0.patch_stride": 2, "stages.0.patch_padding": 2},
    "pos_embed": {f"stages.{i}.pos_embed": True for i in range(3)},
    "gelu": {"act": "gelu"},
    "xavier": {"init": "xavier"},
    "no_qkv_bias_mlp_2": {"stages.1.qkv_bias": False, "stages.2.mlp_ratio": 2.0},
    "no_head": {"num_classes": 0},
    "attn_scale_head": {f"stages.{i}.attn_scale": "head" for i in range(3)},
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("size", [32, 224])
def test_variant_builds_and_runs(overrides, size):
    model = tiny_model(**overrides)
    with torch.no_grad():
        out = forward(model.eval(), size)
    assert out.shape == (2, 48 if overrides.get("num_classes") == 0 else 10)
    assert torch.isfinite(out).all()
    forward(model.train(), size).square().mean().backward()  # training mode: dropouts, BatchNorm batch stats
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_variant_structure():
    keys = lambda **o: set(tiny_model(**o).state_dict())  # noqa: E731
    avg = keys(**VARIANTS["avg"])
    assert not any("conv_proj" in k for k in avg)  # pooling has no weights
    linear = keys(**VARIANTS["linear"])
    assert not any("conv_proj" in k for k in linear)
    default = keys()
    assert "stages.1.blocks.0.attn.conv_proj_k.bn.running_var" in default
    assert "stages.2.cls_token" in default and "stages.2.cls_token" not in keys(**VARIANTS["no_cls_token"])
    assert not any(k.endswith("pos_embed") for k in default)
    proj = tiny_model(**VARIANTS["patch_embed"]).stages[0].patch_embed.proj
    assert proj.kernel_size == proj.stride == (4, 4) and proj.padding == (0, 0)
    assert tiny_model(**VARIANTS["no_qkv_bias_mlp_2"]).stages[1].blocks[0].attn.proj_q.bias is None


@pytest.mark.parametrize(
    "stride_kv, method, expected", [(2, "dw_bn", 16), (1, "dw_bn", 64), (2, "avg", 25), (2, "linear", 64)]
)
def test_number_of_keys_and_values(stride_kv, method, expected):
    """At 32x32 stage 0 has an 8x8 map: kv stride 2 leaves 4x4 = 16 keys, stride 1 (or linear) all 64;
    the official average pooling rounds up (ceil_mode): 5x5 = 25."""
    model = tiny_model(**{"stages.0.stride_kv": stride_kv, "stages.0.qkv_proj_method": method}).eval()
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = args[0].shape[1]  # tokens going into the Linear projection

        return hook

    attn = model.stages[0].blocks[0].attn
    attn.proj_k.register_forward_hook(record("k"))
    attn.proj_q.register_forward_hook(record("q"))
    with torch.no_grad():
        forward(model, 32)
    assert seen == {"k": expected, "q": 64}


def test_pos_embed_second_resolution():
    model = tiny_model(**VARIANTS["pos_embed"]).eval()  # made for 224: stage maps 56, 28, 14
    assert [tuple(s.pos_embed.shape[-2:]) for s in model.stages] == [(56, 56), (28, 28), (14, 14)]
    x224, x96 = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        before = model(x224), model(x96)
        model.stages[0].pos_embed.add_(0.5)  # a shift of the embedding must reach the output at both sizes
        after = model(x224), model(x96)
    for b, a in zip(before, after):
        assert not torch.allclose(a, b)
    model.train()
    model(torch.randn(2, 3, 96, 96)).sum().backward()  # the interpolated embedding is trained
    assert model.stages[0].pos_embed.grad.abs().sum() > 0


def test_pos_embed_made_for_small_image_runs_larger():
    model = tiny_model(image_size=32, **VARIANTS["pos_embed"]).eval()
    assert tuple(model.stages[0].pos_embed.shape[-2:]) == (8, 8)
    assert forward(model, 224).shape == (2, 10)


def test_drop_rates_in_train_mode():
    rates = {f"stages.{i}.{k}": 0.3 for i in range(3) for k in ("drop_rate", "attn_drop_rate", "drop_path_rate")}
    model = tiny_model(**rates)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # dropout and stochastic depth are active
    a.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_stage_shallower_than_its_index_with_drop_path():
    """HF's port breaks here (it indexes the drop-path rates by the stage number); ours must not."""
    model = tiny_model(**{"stages.2.depth": 1, "stages.2.drop_path_rate": 0.2, "stages.1.drop_path_rate": 0.2})
    model.train()
    assert forward(model, 64).shape == (2, 10)


def test_activations_differ():
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for act in ("quick_gelu", "gelu"):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(tiny_model(act=act).eval()(x))
    assert not torch.allclose(*outs)
    assert any(isinstance(m, nn.GELU) for m in tiny_model(act="gelu").modules())
    assert not any(isinstance(m, nn.GELU) for m in tiny_model(act="quick_gelu").modules())
    assert torch.allclose(cvt_train.models.QuickGELU()(x), x * torch.sigmoid(1.702 * x))


BAD = [
    ({"stages.1.num_heads": 5}, "model.stages.1.num_heads"),
    ({"stages.0.patch_stride": 0}, "model.stages.0.patch_stride"),
    ({"stages.2.stride_kv": 0}, "model.stages.2.stride_kv"),
    ({"stages.2.qkv_proj_method": "conv"}, "model.stages.2.qkv_proj_method"),
    ({"stages.0.embed": "pixels"}, "model.stages.0.embed"),
    ({"stages.1.dim": 64}, "model.stages.1.dim: unknown key"),
    ({"dropout": 0.1}, "model.dropout: unknown key"),
    ({"stages.5.depth": 2}, "model.stages.5.depth"),
    ({"stages.0.depth": "two"}, "model.stages.0.depth='two': expected an integer"),
    ({"stages.0.depth": 1.5}, "model.stages.0.depth=1.5: expected an integer"),
    (
        {"stages.2.cls_token": "maybe"},
        "model.stages.2.cls_token='maybe': expected true or false",
    ),  # "yes" is YAML's true
    ({"stages.1.drop_path_rate": 1.0}, "model.stages.1.drop_path_rate"),
    ({"stages.1.padding_q": 0}, "model.stages.1.padding_q"),
    ({"stages.1.stride_q": 2}, "model.stages.1.stride_q"),
    ({"stages.2.qkv_proj_method": "avg", "stages.2.padding_kv": 2}, "model.stages.2.padding_kv"),
    ({"stages.0.qkv_proj_method": "linear", "stages.0.stride_q": 2}, "model.stages.0.stride_q"),  # no-op otherwise
    ({"act": "relu"}, "model.act"),
    ({"image_size": 2}, "model.stages.0."),  # the map vanishes in stage 0's embedding
    ({"image_size": 16, "stages.2.patch_padding": 0}, "model.stages.2."),  # 16 -> 4 -> 2, too small for a 3x3
    ({"image_size": 32, "stages.2.kernel_qkv": 5, "stages.2.padding_q": 2}, "model.stages.2.kernel_qkv"),  # k/v map
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m for _, m in BAD])
def test_bad_config_names_stage_and_key(overrides, message):
    with pytest.raises(UserError) as e:
        tiny_model(**overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, size, stage", [({}, 2, 0), ({"stages.2.patch_padding": 0}, 16, 2)])
def test_too_small_input_fails_at_first_forward(overrides, size, stage):
    model = tiny_model(**overrides).eval()
    with pytest.raises(UserError, match=rf"model\.stages\.{stage}\..*{size}x{size}"):
        forward(model, size)


def test_unknown_preset():
    with pytest.raises(UserError, match="cvt13"):
        cvt_train.create_model("cvt99")


def test_batch_size_one():
    model = tiny_model().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        full, single = model(x), model(x[:1])
    assert single.shape == (1, 10)
    torch.testing.assert_close(single, full[:1], atol=1e-5, rtol=0)
    model.train()
    assert model(x[:1]).shape == (1, 10)  # train mode too (BatchNorm still sees a 2x2 k/v map at 64x64)
    # at 32x32 stage 2's k/v map is 1x1: BatchNorm cannot train on one value per channel; one clear line instead
    with pytest.raises(UserError, match=r"^model\.stages\.2: training on a batch of 1 at 32x32 .* batch of 2 or more"):
        model(x[:1, :, :32, :32])
    assert model(x[:2, :, :32, :32]).shape == (2, 10)


@pytest.mark.slow  # cold: 15-35 s on 2 CPU cores (compiling C++ kernels); 3-5 s with inductor's cache
def test_torch_compile_matches_eager():
    model = tiny_model(**{"stages.1.depth": 1, "stages.2.depth": 1}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        start = time.perf_counter()
        compiled = torch.compile(model)(x)
    print(f"torch.compile + first call: {time.perf_counter() - start:.1f} s")
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


# The MODEL.SPEC block of the official experiments/imagenet/cvt/cvt-13-224x224.yaml.
CVT13_SPEC = {
    "INIT": "trunc_norm",
    "NUM_STAGES": 3,
    "PATCH_SIZE": [7, 3, 3],
    "PATCH_STRIDE": [4, 2, 2],
    "PATCH_PADDING": [2, 1, 1],
    "DIM_EMBED": [64, 192, 384],
    "NUM_HEADS": [1, 3, 6],
    "DEPTH": [1, 2, 10],
    "MLP_RATIO": [4.0, 4.0, 4.0],
    "ATTN_DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_PATH_RATE": [0.0, 0.0, 0.1],
    "QKV_BIAS": [True, True, True],
    "CLS_TOKEN": [False, False, True],
    "POS_EMBED": [False, False, False],
    "QKV_PROJ_METHOD": ["dw_bn", "dw_bn", "dw_bn"],
    "KERNEL_QKV": [3, 3, 3],
    "PADDING_KV": [1, 1, 1],
    "STRIDE_KV": [2, 2, 2],
    "PADDING_Q": [1, 1, 1],
    "STRIDE_Q": [1, 1, 1],
}


def test_from_official_spec(cvt13):
    model = cvt_train.from_official_spec(CVT13_SPEC)
    assert num_params(model) == PARAMS["cvt13"]
    reference = cvt13.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    assert not any(isinstance(m, nn.GELU) for m in model.modules())  # official QuickGELU by default


def test_from_official_spec_overrides_and_scalars():
    spec = {**CVT13_SPEC, "QKV_BIAS": False, "DIM_EMBED": [16, 32, 48], "NUM_HEADS": [1, 2, 3], "INIT": "xavier"}
    model = cvt_train.from_official_spec(spec, num_classes=7, act="gelu")
    assert any(isinstance(m, nn.GELU) for m in model.modules())
    assert model.head.out_features == 7 and model.cfg.init == "xavier"
    assert all(s.blocks[0].attn.proj_q.bias is None for s in model.stages)  # the scalar reached every stage
    with pytest.raises(UserError, match="DEPTH"):
        cvt_train.from_official_spec({**CVT13_SPEC, "DEPTH": [1, 2]})
    with pytest.raises(UserError, match="WIDTH"):
        cvt_train.from_official_spec({**CVT13_SPEC, "WIDTH": [1, 2, 3]})


def test_no_weight_decay():
    model = tiny_model(**VARIANTS["pos_embed"])
    names = model.no_weight_decay()
    assert {"stages.2.cls_token", "stages.0.pos_embed", "norm.weight", "head.bias"} <= names
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, (nn.Linear, nn.Conv2d)) and p_name == "weight":
                assert name not in names
            elif p_name == "bias" or isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                assert name in names


def test_official_init(cvt13):
    model = cvt13
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.0005 and abs(weights.mean().item()) < 1e-4
    assert all((m.bias == 0).all() for m in linears)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    assert 0.01 < model.stages[2].cls_token.std() < 0.03


def test_xavier_init():
    model = tiny_model(init="xavier")
    fc1 = model.stages[2].blocks[0].mlp.fc1  # 48 -> 192
    bound = (6 / (48 + 192)) ** 0.5
    assert fc1.weight.abs().max() <= bound
    assert abs(fc1.weight.std().item() - bound / 3**0.5) < 0.05 * bound
    assert (fc1.bias == 0).all()


def test_dotted_overrides_and_config_sources():
    model = cvt_train.create_model(
        "cvt13", num_classes=10, init="xavier", **{"stages.0.patch_stride": 2, "stages.2.depth": 3}
    )
    assert model.stages[0].patch_embed.proj.stride == (2, 2)
    assert model.stages[1].patch_embed.proj.stride == (2, 2)
    assert len(model.stages[2].blocks) == 3 and model.head.out_features == 10
    # a Hydra DictConfig (what the trainer passes) and a ModelConfig give the same model as the name
    yaml = OmegaConf.load(cvt_train.models.presets.CONF_DIR / "model" / "cvt13.yaml")
    assert num_params(cvt_train.create_model(yaml, init="xavier")) == PARAMS["cvt13"]
    assert num_params(cvt_train.create_model(model.cfg)) == num_params(model)


def test_attention_runs_sdpa_with_the_official_scale(monkeypatch):
    """Inference goes through F.scaled_dot_product_attention with an explicit scale of the whole width**-0.5 (the
    official code's, not the head width's); the plain matmul path CPU training takes for short sequences gives the
    same values and gradients."""
    from torch.nn import functional as F

    from cvt_train.models import layers

    real, seen = F.scaled_dot_product_attention, []

    def record(q, k, v, dropout_p=0.0, scale=None, **kw):
        seen.append((q.shape[1] * q.shape[-1], scale))  # heads x head width = the stage's width
        return real(q, k, v, dropout_p=dropout_p, scale=scale, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    model = tiny_model().eval()
    with torch.no_grad():
        forward(model, 32)
    depths = [s.depth for s in model.cfg.stages]
    assert len(seen) == sum(depths)
    assert all(scale == dim**-0.5 for dim, scale in seen)
    monkeypatch.undo()

    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for n in (17, 5, 5))
    attend = layers.SoftmaxAttention(0.125, 0.0).train()
    assert not attend.fused(q, k)  # requires_grad on CPU with a small score matrix: the matmul path
    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    seen.clear()
    plain = attend(q, k, v)
    monkeypatch.undo()
    assert not seen  # SDPA was not called
    fused = F.scaled_dot_product_attention(q, k, v, scale=0.125)
    torch.testing.assert_close(plain, fused)
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (plain, fused)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        assert attend.fused(q, k)  # no gradient: SDPA's forward is the fastest
    big_q = torch.randn(1, 1, 2**10, 8, requires_grad=True)
    assert attend.fused(big_q, torch.randn(1, 1, 2**8 + 1, 8))  # long sequences: SDPA


def test_head_width_scale_is_the_official_scale_with_q_multiplied_by_sqrt_heads():
    """attn_scale=head multiplies each stage's attention logits by sqrt(num_heads): the same logits as the official
    scale with the weights of q's Linear layer (and its bias) multiplied by sqrt(num_heads)."""
    head = randomize(tiny_model(**VARIANTS["attn_scale_head"])).eval()
    official = tiny_model().eval()
    official.load_state_dict(head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        differs = not torch.allclose(head(x), official(x), atol=1e-3)
        for stage, s in zip(official.stages, official.cfg.stages):
            for block in stage.blocks:
                block.attn.proj_q.weight.mul_(s.num_heads**0.5)
                block.attn.proj_q.bias.mul_(s.num_heads**0.5)
        torch.testing.assert_close(head(x), official(x), rtol=1e-4, atol=1e-5)
    assert differs  # stages 1 and 2 have 2 and 3 heads: the two scales give different logits
    for listed in (hf_differences(head.cfg)[1], official_differences(head.cfg)[1]):
        assert [d.split(" ")[0] for d in listed if "attn_scale" in d] == [
            "model.stages.1.attn_scale=head",
            "model.stages.2.attn_scale=head",
        ]  # stage 0 has one head: the same logits either way


@pytest.mark.slow  # compiles a forward and a backward graph: 30-60 s cold on 2 CPU cores
def test_torch_compile_training_step_matches_eager():
    """The training step too: same outputs, same gradients, same BatchNorm statistics afterwards."""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_model(**{"stages.1.depth": 1, "stages.2.depth": 1}).train()
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(4, 3, 32, 32)
    out_eager = eager(x)
    out_eager.square().mean().backward()
    out_compiled = torch.compile(compiled_model)(x)
    out_compiled.square().mean().backward()
    torch.testing.assert_close(out_compiled, out_eager, atol=1e-5, rtol=0)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(c, b, atol=1e-6, rtol=0, msg=name)
    assert not counters["graph_break"], dict(counters["graph_break"])  # QuickGELU's autograd function included


def test_compile_model_modes():
    from cvt_train.models import compile_model

    model = tiny_model()
    with pytest.raises(ValueError, match="unknown mode 'fast'; choose one of full, regional"):
        compile_model(model, mode="fast")
    full = compile_model(model)  # a wrapper; the model itself stays eager and keeps its state-dict names
    assert full is not model and full._orig_mod is model
    assert compile_model(model, mode="regional") is model  # in place
    assert all(k == j for k, j in zip(model.state_dict(), tiny_model().state_dict()))


@pytest.mark.slow  # compiles one block graph per stage, forward and backward: 30-90 s cold on 2 CPU cores
def test_regional_compile_training_step_matches_eager():
    """compile_model(mode="regional"): blocks compiled in place, no graph breaks, one graph per distinct block shape
    (not per block), and the same outputs, gradients and BatchNorm statistics as eager, under bf16 autocast too."""
    import copy

    from torch._dynamo.utils import counters

    from cvt_train.models import compile_model

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_model(**{"stages.2.depth": 3, "stages.2.drop_path_rate": 0.0}).train()  # no random drop path
    compiled = compile_model(copy.deepcopy(eager), mode="regional")
    x = torch.randn(4, 3, 32, 32)
    for dtype in (None, torch.bfloat16):
        outs = []
        for model in (eager, compiled):
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            out.float().square().mean().backward()
            outs.append(out)
        tol = {"atol": 1e-5, "rtol": 1e-4} if dtype is None else {"atol": 2e-2, "rtol": 2e-2}
        torch.testing.assert_close(outs[1], outs[0], **tol)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **tol, msg=name)
            p.grad = q.grad = None
        for (name, b), c in zip(eager.named_buffers(), compiled.buffers()):  # BatchNorm statistics
            torch.testing.assert_close(c, b, **(tol if dtype else {"atol": 1e-6, "rtol": 0}), msg=name)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # 3 stages x (fp32, bf16): one graph per stage's block shape and precision, shared by the 3 blocks of stage 2
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


def _reference_block(block, x, h, w):
    """The official formulation of a Block, written out from its parameters: conv, BatchNorm (batch statistics),
    tokens, cls token joined before the Linear layers, einsum attention, x * sigmoid(1.702 x) between fc1 and fc2."""
    from torch.nn import functional as F

    attn, mlp = block.attn, block.mlp
    y = block.norm1(x)
    cls, y = (y[:, :1], y[:, 1:]) if attn.has_cls else (None, y)
    m = y.transpose(1, 2).reshape(y.shape[0], -1, h, w)

    def project(proj):
        conv, bn = proj.conv, proj.bn
        z = F.conv2d(m, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        z = F.batch_norm(z, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        z = z.flatten(2).transpose(1, 2)
        return z if cls is None else torch.cat((cls, z), dim=1)

    q, k, v = (
        lin(project(p))
        for lin, p in (
            (attn.proj_q, attn.conv_proj_q),
            (attn.proj_k, attn.conv_proj_k),
            (attn.proj_v, attn.conv_proj_v),
        )
    )
    q, k, v = (z.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for z in (q, k, v))
    scores = torch.einsum("bhld,bhtd->bhlt", q, k) * attn.scale
    z = torch.einsum("bhlt,bhtv->bhlv", scores.softmax(dim=-1), v).transpose(1, 2).flatten(2)
    x = x + attn.proj(z)
    u = mlp.fc1(block.norm2(x))
    return x + mlp.fc2(u * torch.sigmoid(1.702 * u))


@pytest.mark.parametrize("stage, size", [(0, 56), (2, 7)], ids=["sdpa_no_cls", "plain_attention_cls"])
def test_block_train_outputs_and_gradients_match_official_formulation(stage, size):
    """Train mode, fp32: the same outputs and the same gradients (parameters and input) as the plain formulation,
    through SDPA (stage 0 at 56x56: 3136 x 784 scores) and through the plain softmax path (stage 2 with a cls
    token at 7x7)."""
    torch.manual_seed(0)
    block = tiny_model().stages[stage].blocks[0].train()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dim = block.norm1.normalized_shape[0]
    x = torch.randn(2, size * size + block.attn.has_cls, dim, requires_grad=True)
    outs, grads = [], []
    for fn in (lambda: block(x, size, size), lambda: _reference_block(block, x, size, size)):
        out = fn()
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *block.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_quick_gelu_values_and_gradients():
    """silu(1.702 x) / 1.702 with its one-kernel backward is x * sigmoid(1.702 x), to second order."""
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    act = cvt_train.models.QuickGELU()
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))
    (g,) = torch.autograd.grad(act(x).sum(), x)
    (expected,) = torch.autograd.grad((x * torch.sigmoid(1.702 * x)).sum(), x)
    torch.testing.assert_close(g, expected)
    assert torch.autograd.gradcheck(act, (x,)) and torch.autograd.gradgradcheck(act, (x,))
    y = torch.randn(4, 8, dtype=torch.bfloat16)
    assert act(y).dtype == torch.bfloat16


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("mode", ["train", "eval", "train_bf16"])
def test_mlp_calls_fc1_and_fc2_as_modules(act, mode):
    """Forward hooks on fc1/fc2 fire and a swapped-in fc1 (a LoRA-style wrapper) is used, in every configuration."""
    model = tiny_model(act=act).train(mode != "eval")
    mlps = [m for m in model.modules() if type(m).__name__ == "Mlp"]
    calls = []
    for mlp in mlps:
        for name in ("fc1", "fc2"):
            getattr(mlp, name).register_forward_hook(lambda mod, args, out, n=name: calls.append(n))

    def run():
        with (
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "train_bf16"),
            torch.set_grad_enabled(mode != "eval"),
        ):
            return model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))

    base = run()
    assert calls.count("fc1") == calls.count("fc2") == len(mlps)

    class Wrapped(nn.Module):  # a LoRA-like wrapper: the wrapped Linear plus a learned offset
        def __init__(self, inner):
            super().__init__()
            self.inner, self.delta = inner, nn.Parameter(torch.full((inner.out_features,), 0.5))

        def forward(self, x):
            return self.inner(x) + self.delta

    mlps[0].fc1 = Wrapped(mlps[0].fc1)
    assert not torch.allclose(run().float(), base.float())


def test_kv_projections_in_fp32_only_when_training_on_cpu_under_autocast():
    """oneDNN's bf16 backward of a strided depthwise conv is slow: the k and v convs (stride 2) run in fp32 when
    training on CPU under autocast, q's (stride 1) in bf16; without grad, or with stride_kv 1, all run in bf16."""

    def conv_dtypes(model, grad):
        seen = {}
        attn = model.stages[1].blocks[0].attn
        hooks = [
            getattr(attn, f"conv_proj_{n}").register_forward_hook(
                lambda mod, args, out, n=n: seen.setdefault(n, (args[0].dtype, out.dtype)) and None
            )
            for n in "qkv"
        ]
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            out = model(torch.randn(2, 3, 32, 32))
        if grad:
            out.float().sum().backward()
        for hook in hooks:
            hook.remove()
        return seen

    bf16, fp32 = (torch.bfloat16,) * 2, (torch.float32,) * 2
    assert conv_dtypes(tiny_model().train(), True) == {"q": bf16, "k": fp32, "v": fp32}
    assert conv_dtypes(tiny_model().train(), False) == {"q": bf16, "k": bf16, "v": bf16}
    assert conv_dtypes(tiny_model().eval(), False) == {"q": bf16, "k": bf16, "v": bf16}
    stride_1 = tiny_model(**{"stages.1.stride_kv": 1}).train()
    assert conv_dtypes(stride_1, True) == {"q": bf16, "k": bf16, "v": bf16}
