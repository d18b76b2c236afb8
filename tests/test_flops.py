"""count_macs: the paper's GMACs, attention included whichever kernel runs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cvt_train import count_macs
from cvt_train.flops import count_flops

# Paper Table 2 ("FLOPs" there are multiply-adds).
PAPER = [("cvt13", 224, 4.5), ("cvt21", 224, 7.1), ("cvt13", 384, 16.3), ("cvt21", 384, 24.9), ("cvtw24", 384, 193.2)]


@pytest.mark.parametrize("name, size, gmacs", PAPER, ids=[f"{n}@{s}" for n, s, _ in PAPER])
def test_paper_gmacs(name, size, gmacs, request):
    model = request.getfixturevalue(name)
    model.train()
    macs = count_macs(model, (3, size, size))
    assert abs(macs / 1e9 - gmacs) <= 0.02 * gmacs
    assert model.training  # mode restored


def test_meta_count_equals_a_real_forward():
    model = tiny_model().eval()
    x = torch.zeros(1, 3, 64, 64)
    assert count_macs(model, (3, 64, 64)) == count_flops(model, x) // 2
    assert count_macs(torch.compile(model), (3, 64, 64)) == count_macs(model, (3, 64, 64))  # unwrapped, not run


def attention_macs(model, x) -> int:
    """MACs the counter attributes to attention: a fused SDPA kernel, or batched matmuls (math backend, or a
    plain q @ k^T ... path)."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()["Global"]
    return sum(n for op, n in counts.items() if "scaled_dot_product" in str(op) or "bmm" in str(op)) // 2


# By hand: tokens T_q, keys T_k (k/v stride 2) and width C per block; q @ k^T and attn @ v cost T_q * T_k * C each.
# The last stage has a cls token (+1 query and key) and 2 blocks.
ATTENTION = {
    32: 2 * (64 * 16 * 16 + 16 * 4 * 32 + 2 * 5 * 2 * 48),  # maps 8x8, 4x4, 2x2; k/v 4x4, 2x2, 1x1
    96: 2 * (576 * 144 * 16 + 144 * 36 * 32 + 2 * 37 * 10 * 48),  # maps 24x24, 12x12, 6x6; k/v 12x12, 6x6, 3x3
}


@pytest.mark.parametrize("size", ATTENTION.keys())
@torch.no_grad()
def test_attention_counted_whichever_kernel_runs(size):
    model = tiny_model().eval()
    x = torch.zeros(1, 3, size, size)
    assert attention_macs(model, x) == ATTENTION[size]
    total = count_flops(model, x)
    assert count_macs(model, (3, size, size)) * 2 == total
    with sdpa_kernel(SDPBackend.MATH):
        assert attention_macs(model, x) == ATTENTION[size]
        assert count_flops(model, x) == total


def test_fused_cpu_attention_kernel_counted():
    """torch's counter knows the CUDA attention kernels, not the CPU flash one; flops.py adds it."""
    shapes = [(2, 3, 100, 8), (2, 3, 25, 8), (2, 3, 25, 8)]
    forward = 2 * 2 * (2 * 3 * 100 * 25 * 8)  # two matmuls of B*H*Tq*Tk*d multiply-adds, 2 FLOPs each
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        q, k, v = (torch.randn(s, requires_grad=True) for s in shapes)
        with sdpa_kernel(backend), FlopCounterMode(display=False) as counter:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            fwd = counter.get_total_flops()
            out.sum().backward()
        assert fwd == forward
        assert counter.get_total_flops() == 3 * forward  # backward: two matmuls per forward matmul


# Forward of a conv: B * H' * W' * C_out * (C_in / groups) * k * k multiply-adds. Its backward computes the input
# gradient and the weight gradient, each exactly as many again, whatever `groups` is (torch's own formula counts
# the weight gradient `groups` times too much, i.e. C x for a depthwise conv).
@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_conv_backward_is_two_forwards(groups, transposed):
    conv_cls = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
    conv = conv_cls(16, 32, 3, stride=2, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    out_h = conv(x).shape[-1]
    # each output position of a conv (input position of a transposed conv) costs 16 * 32 / groups * 3 * 3 MACs
    positions = 2 * (9 if transposed else out_h) ** 2
    forward_macs = positions * 16 * 32 // groups * 9
    assert count_flops(conv, x) == 2 * forward_macs
    assert count_flops(conv, x, backward=True) == 3 * 2 * forward_macs
    x.requires_grad_(False)  # no input gradient: forward + weight gradient only
    assert count_flops(conv, x, backward=True) == 2 * 2 * forward_macs
