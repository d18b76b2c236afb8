"""trainer.precision: its names, the autocast dtype each stands for, and the autocast context."""

from __future__ import annotations

import contextlib
import functools
import logging
import platform

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

# None = fp32: no autocast. "auto" = bf16 where the device computes it natively, else fp16 on GPUs and fp32 on CPUs.
# (The names a config may give are config.py's PRECISIONS, checked by each app's validate.)
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
    elif device.type == "cpu":
        native_bf16 = cpu_has_native_bf16()
        if precision == "auto":
            precision = "bf16" if native_bf16 else "fp32"
        elif precision == "bf16" and not native_bf16:
            warn_emulated_bf16_once()
    elif precision == "auto":
        precision = "fp16"
    return PRECISIONS[precision]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512_BF16 or AMX on x86, the BF16 feature on Arm (Linux).
    Without it oneDNN converts to fp32 and back around every matmul: on a 2-core Ice Lake Xeon (AVX-512, no
    AVX512_BF16) bf16 autocast trained cvt_cifar_cpu at 0.5x the images/s of fp32, where a Zen 5 with AVX512_BF16
    ran it at 1.7x."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private; absent from older torch
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    if machine in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo") as f:
                return any(line.startswith("Features") and " bf16" in line for line in f)
        except OSError:  # not Linux (macOS): no cheap way to ask; fp32 is the safe default
            return False
    return False


@functools.cache
def warn_emulated_bf16_once() -> None:
    log.warning(
        "trainer.precision=bf16: this CPU has no native bf16 (no AVX512_BF16 or AMX), so bf16 autocast is emulated "
        "and typically slower than fp32; trainer.precision=auto picks fp32 here"
    )


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
