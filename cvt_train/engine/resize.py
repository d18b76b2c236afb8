"""trainer.resize: progressive resizing, as FFCV's ResNet recipes do it. The training inputs start small and grow to
data.image_size, so the early epochs, which learn coarse features, cost less; the last ones run at full size, which
is what the model is evaluated at. CvT has no position embedding to interpolate: its maps just shrink.

The size of an epoch is a pure function of (epoch, planned epochs), so a resumed run sees the sizes it would have.
The batch is resized where it is used (on the device, after the augmentation) with antialiased bilinear
interpolation: a linear map, so resizing the normalised batch equals normalising the resized one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models import stage_map_sizes


def input_size(epoch: int, epochs: int, rc, full: int) -> int:
    """The training input size of (0-based) `epoch` of `epochs`: rc.min_size until rc.ramp[0] of the epochs have
    passed, then growing linearly to `full` at rc.ramp[1], rounded to the nearest multiple of rc.multiple (and kept
    within min_size..full)."""
    if rc.min_size is None:
        return full
    start, end = rc.ramp
    done = epoch / epochs
    if done <= start and done < end:
        return rc.min_size
    grown = 1.0 if done >= end else (done - start) / (end - start)
    size = rc.min_size + grown * (full - rc.min_size)
    return max(rc.min_size, min(full, math.floor(size / rc.multiple + 0.5) * rc.multiple))


def input_sizes(epochs: int, rc, full: int) -> list[int]:
    """The size of every epoch of a run of `epochs` epochs."""
    return [input_size(e, epochs, rc, full) for e in range(epochs)]


def all_sizes(rc, full: int) -> list[int]:
    """Every size the schedule can give, whatever the epoch count (those the budget's calibration times)."""
    return sorted(set(input_sizes(1000, rc, full)))


def check(rc, model_cfg, full: int) -> None:
    """min_size below the full size, and whole token maps at every size the schedule can give."""
    if rc.min_size is None:
        return
    if rc.min_size > full:
        raise UserError(
            f"trainer.resize.min_size={rc.min_size}: larger than data.image_size={full}; lower it or set "
            "trainer.resize.min_size=null"
        )
    if rc.ramp[0] > rc.ramp[1]:
        raise UserError(f"trainer.resize.ramp={list(rc.ramp)}: expected [start, end] with start <= end")
    for size in all_sizes(rc, full):
        try:
            stage_map_sizes(model_cfg, (size, size))
        except UserError as e:
            raise UserError(f"trainer.resize.min_size={rc.min_size}: at {size}x{size}: {e}; raise it") from None


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """A (N, C, H, W) float batch at size x size (the batch itself when it is that size already)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def describe(sizes: list[int]) -> str:
    """'16px for epochs 1-9, 24px for 10-27, 32px for 28-48'."""
    runs, first = [], 0
    for e in range(1, len(sizes) + 1):
        if e == len(sizes) or sizes[e] != sizes[first]:
            span = f"{first + 1}-{e}" if e - first > 1 else f"{e}"
            runs.append(f"{sizes[first]}px for epoch{'s' if e - first > 1 else ''} {span}")
            first = e
    return ", ".join(runs)
