"""trainer.precision: its names, the autocast dtype each stands for, and the autocast context."""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError

# None = fp32: no autocast. "auto" = bf16 where the device has it, else fp16. (The names a config may give are
# config.py's PRECISIONS, checked by each app's validate.)
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for trainer.precision on `device` (None = fp32, no autocast)."""
    if device.type == "cuda":
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere on; older GPUs emulate it slowly
        if precision == "auto":
            precision = "bf16" if native_bf16 else "fp16"
        if precision == "bf16" and not native_bf16:
            raise UserError(
                f"trainer.precision=bf16: {torch.cuda.get_device_name(device)} has no native bf16; "
                "use fp16 (or auto) or fp32"
            )
    elif precision == "auto":
        precision = "bf16" if device.type == "cpu" else "fp16"
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def set_gpu_defaults(device: torch.device, tf32: bool = True, benchmark: bool = True) -> None:
    """On CUDA: TF32 tensor cores for fp32 matmuls and convs (Ampere and newer; ~10 mantissa bits, what fp32
    training in the field runs with) unless tf32=False, and cuDNN's autotuner unless runs must be deterministic.
    torch >= 2.9 has the per-backend `fp32_precision` switches; older ones the `allow_tf32` flags (never both:
    torch refuses a mix)."""
    if device.type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
