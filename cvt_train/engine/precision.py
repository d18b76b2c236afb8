"""trainer.precision: its names, the autocast dtype each stands for, and the autocast context."""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError

# None = fp32: no autocast. "auto" = bf16 where the device has it, else fp16.
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
CHOICES = ("auto", *PRECISIONS)


def check_precision(precision: str) -> None:
    """The name alone, so that a typo stops the run before any device is touched."""
    if precision not in CHOICES:
        raise UserError(f"trainer.precision: {precision!r} is not one of {', '.join(CHOICES)}")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for trainer.precision on `device` (None = fp32, no autocast)."""
    check_precision(precision)
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if precision == "auto":
        precision = "bf16" if bf16_ok else "fp16"
    if precision == "bf16" and not bf16_ok:
        raise UserError(f"trainer.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or fp32")
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
