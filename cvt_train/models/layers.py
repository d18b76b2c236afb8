"""The CvT layers with CPU fast paths, kept here so that cvt.py reads as the plain formulation.

Each layer computes exactly what its docstring's formula says; how it computes it is chosen where the choice can be
made: from the configuration at construction (which projections are strided depthwise convs), else from the call
(device, grad mode, autocast dtype, sequence lengths). Those are read per call, not cached on a first call, because
one model runs on the meta device (count_macs), the CPU and CUDA, with and without grad and autocast; each is a
Python-level test that torch.compile turns into a guard, so compiled graphs contain only the chosen path.

Speed notes (measured on a 2-core CPU; docs/performance.md has the tables):
- k and v depthwise convs in fp32 when training on CPU under autocast: oneDNN's bf16 backward of a *strided*
  depthwise conv is ~20x slower than its fp32 one (C=384 14x14: 14.5 ms vs 0.74 ms fwd+bwd); the forward and
  stride 1 are fine, so q's conv stays in bf16 and stride-1 k/v projections are left alone.
- One cast of the map for the three convs (autocast would cast once per conv), made dense channels-last: one copy.
- BatchNorm folded into the conv in eval mode (computed from the parameters on every call, nothing cached).
- Plain softmax attention (matmul, softmax, matmul) instead of SDPA when training on CPU with a small score
  matrix: SDPA's CPU forward is the fastest everywhere, but its backward is slow for all but long sequences
  (CvT-13 at 224: stage 1's 784 x 196 trains 1.4x and stage 2's 197 x 50 4x faster plainly; stage 0's 3136 x 784
  stays with SDPA).
- QuickGELU as one custom autograd function: x * sigmoid(1.702 x) == silu(1.702 x) / 1.702, forward a scale, a
  SiLU and an in-place unscale, backward a scale and one silu_backward kernel. It replaces folding the two
  scalings into fc1's and fc2's weights (F.linear with scaled weights), which bypassed the fc1/fc2 modules and so
  their forward hooks, LoRA wrappers and quantisation swaps; QuickGELU's docstring has the measured cost (a few %
  of a training step).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

_QUICK_GELU_SCALE = 1.702


class _QuickGELUFunction(torch.autograd.Function):
    """x * sigmoid(a x) computed as silu(a x) / a, whose derivative in x is silu'(a x) (silu_backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)  # the input (not a * x): double backward then differentiates through it
        return F.silu(x * _QUICK_GELU_SCALE).div_(_QUICK_GELU_SCALE)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        ax = x * _QUICK_GELU_SCALE
        if torch.is_grad_enabled():  # double backward (create_graph): silu_backward has no derivative of its own
            s = torch.sigmoid(ax)
            return grad * s * (1 + ax * (1 - s))
        return torch.ops.aten.silu_backward(grad, ax)


class QuickGELU(nn.Module):
    """The official CvT activation: x * sigmoid(1.702 x), a cheap approximation of GELU.

    Computed as silu(1.702 x) / 1.702 in one autograd function (forward: a scale, a SiLU, an in-place unscale;
    backward: a scale and one silu_backward), between fc1 and fc2, which stay module calls. This replaced folding
    the two scalings into fc1's and fc2's weights (F.linear with scaled weights: one SiLU forward, one backward),
    which bypassed the fc1/fc2 modules, so their hooks, LoRA wrappers and quantisation swaps. Its cost, measured on
    a 2-core CPU, bf16 autocast, fwd+bwd, min of 40 alternating runs in one process: the MLP of each stage (CvT-13
    at 224 batch 8, cvt_cifar_tiny at 32 batch 128) 1.03-1.05x the fold's, the whole training step 1.02-1.06x
    (CvT-13 585 vs 557 ms); the autograd three-op form x * sigmoid(1.702 x) costs 1.04-1.9x on the same MLPs.
    The input (not 1.702 x) is saved so that double backward works, for ~10% of the activation's own time.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuickGELUFunction.apply(x)


def make_act(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes convs and matmuls in at this point (x's own dtype when autocast is off)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class ConvProjection(nn.Sequential):
    """`dw_bn`: a depthwise conv then BatchNorm (keys `conv`/`bn`, the official ones).

    In eval mode the BatchNorm is folded into the conv's weight and bias: one pass over the map instead of two.
    A map given in the parameters' dtype while autocast is on runs in that dtype (autocast off): that is how
    projection_inputs asks for the fp32 k/v path. `fp32_when_training_on_cpu`, decided here from the stride, says
    whether this projection wants it.
    """

    def __init__(self, dim: int, kernel: int, padding: int, stride: int):
        conv = nn.Conv2d(dim, dim, kernel, stride, padding, groups=dim, bias=False)
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(dim)))
        self.fp32_when_training_on_cpu = stride > 1  # only the strided depthwise bf16 backward is slow

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        device = m.device.type
        if (
            m.dtype == self.conv.weight.dtype
            and torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device)
        ):
            with torch.autocast(device, enabled=False):
                return self._conv_bn(m)
        return self._conv_bn(m)

    def _conv_bn(self, m: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if bn.training:
            return bn(conv(m))
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C,)
        weight, bias = conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale
        return F.conv2d(m, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_projection(dim: int, method: str, kernel: int, padding: int, stride: int) -> nn.Module:
    """Turns a map into the map a q, k or v is read from."""
    if method == "dw_bn":
        return ConvProjection(dim, kernel, padding, stride)
    if method == "avg":
        return nn.AvgPool2d(kernel, stride, padding, ceil_mode=True)
    return nn.Identity()  # "linear": tokens go straight to the Linear projection


def projection_inputs(m: torch.Tensor, kv_proj: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps the q and the k/v projections read: m cast once to the compute dtype and made dense channels-last
    (one copy at most), and the same for k/v unless `kv_proj` wants its parameters' dtype (fp32 when training on
    CPU under autocast)."""
    mq = m.to(compute_dtype(m), memory_format=torch.channels_last).contiguous(memory_format=torch.channels_last)
    if getattr(kv_proj, "fp32_when_training_on_cpu", False) and m.device.type == "cpu" and torch.is_grad_enabled():
        dtype = kv_proj.conv.weight.dtype
        if mq.dtype != dtype:
            return mq, m.to(dtype, memory_format=torch.channels_last).contiguous(memory_format=torch.channels_last)
    return mq, mq


class SoftmaxAttention(nn.Module):
    """softmax(q k^T * scale) v over (B, heads, T, C / heads) tensors, with dropout on the attention weights.

    SDPA (fused, never materialises the T x T' scores) except when training on CPU with at most 2^18 scores, where
    a matmul, a softmax and a matmul train faster (see the module docstring).
    """

    max_plain_scores = 2**18

    def __init__(self, scale: float, drop: float):
        super().__init__()
        self.scale, self.drop = scale, drop

    def fused(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        training = torch.is_grad_enabled() and q.requires_grad
        return not (training and q.device.type == "cpu" and q.shape[-2] * k.shape[-2] <= self.max_plain_scores)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        drop = self.drop if self.training else 0.0
        if self.fused(q, k):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        attn = (q @ (k * self.scale).transpose(-2, -1)).softmax(dim=-1)  # (B, heads, T, T')
        if drop > 0.0:
            attn = F.dropout(attn, drop)
        return attn @ v


__all__ = [
    "ConvProjection",
    "QuickGELU",
    "SoftmaxAttention",
    "compute_dtype",
    "conv_projection",
    "make_act",
    "projection_inputs",
]
