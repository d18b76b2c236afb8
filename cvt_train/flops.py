"""Multiply-add counting (the paper's "FLOPs") with torch.utils.flop_counter."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

aten = torch.ops.aten


# torch counts the CUDA attention kernels but not the CPU flash kernel SDPA picks here; count it the same way
# (2 matmuls: q @ k^T and attn @ v), so the total does not depend on which kernel ran.
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


def _sdpa_cpu_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)


for _op, _formula in (
    (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), _sdpa_cpu_flops),
    (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None), _sdpa_cpu_backward_flops),
):
    if _op is not None:
        try:
            register_flop_formula(_op)(_formula)
        except RuntimeError:  # already registered by a newer torch
            pass


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """torch's formula, but with the weight gradient of a grouped conv divided by `groups`.

    torch counts the weight gradient as a conv of the input (channels as batch) with grad_out, which treats every
    input channel as seeing every output channel: `groups` times too much, i.e. C x for CvT's depthwise convs.
    """

    def swap01(shape):
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:  # input gradient: a transposed conv of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, x_shape, not transposed)
    if output_mask[1]:  # weight gradient: a conv of the input with grad_out (the other way round if transposed)
        a, b = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(swap01(a), swap01(b), swap01(w_shape)) // groups
    return flops


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode with the grouped-conv backward corrected."""
    return FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _conv_backward_flops})


def count_flops(model: nn.Module, inputs: torch.Tensor, backward: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one forward (and backward) on `inputs`, attention included."""
    with flop_counter() as counter:
        out = model(inputs)
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-adds of one forward pass for one image of `input_size` (C, H, W): the paper's "FLOPs".

    Counted on the meta device (shapes only, no arithmetic and no memory), so even CvT-W24 at 384 costs a blink.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model) if isinstance(getattr(model, "module", None), nn.Module) else model  # DDP
    tensors = {n: torch.empty_like(t, device="meta") for n, t in (*model.named_parameters(), *model.named_buffers())}
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    x = torch.zeros(1, *input_size, dtype=dtype, device="meta")
    was_training = model.training
    model.eval()
    try:
        with flop_counter() as counter:
            torch.func.functional_call(model, tensors, (x,))
        return counter.get_total_flops() // 2
    finally:
        model.train(was_training)
