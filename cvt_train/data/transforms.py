"""Augmentation presets (conf/aug/*.yaml) built from torchvision.transforms.v2, plus the batched ops v2 lacks.

Every random op here draws from torch's default CPU generator *inside a fork_rng block seeded by the caller* (see
loader.py), or from an explicit torch.Generator, so augmentation is a pure function of (seed, epoch, sample/step)
and never touches the RNG the model's dropout uses.

Label smoothing is NOT applied here: targets are class indices, or (with MixUp/CutMix) mixed one-hot vectors, and the
trainer's `CrossEntropyLoss(label_smoothing=aug.label_smoothing)` smooths both kinds. For soft targets PyTorch's
loss smooths `t * (1 - eps) + eps / K`, which equals mixing smoothed one-hots, i.e. timm's `mixup_target` as the
official CvT recipe uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from ..errors import UserError
from ..schema import check_values, rule, typed

CROPS = ("random_resized", "pad_crop", "none")
AUTO_AUGMENTS = (None, "randaugment", "trivialaugment")
INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass
class AugConfig:
    """The keys of every conf/aug/*.yaml (see those files for what each does)."""

    name: str = "none"
    crop: str = rule("none", choices=CROPS, what="crop")
    crop_padding: int = rule(4, ge=0)  # pad_crop: zero padding on each side before the random crop
    crop_scale: list[float] = rule([0.08, 1.0], length=2, item_gt=0, expected="[low, high] with 0 < low <= high")
    crop_ratio: list[float] = rule(
        [0.75, 1.3333333333333333], length=2, item_gt=0, expected="[low, high] with 0 < low <= high"
    )  # random_resized: aspect range
    hflip: float = rule(0.0, ge=0, le=1)  # probability of a horizontal flip
    auto_augment: str | None = rule(None, choices=AUTO_AUGMENTS, what="auto augmentation")
    randaugment_num_ops: int = rule(2, ge=0)
    randaugment_magnitude: int = rule(9, ge=0)  # < randaugment_bins
    randaugment_bins: int = rule(
        11, ge=2
    )  # 11 bins: magnitude 9 = 0.9 of each op's range, as timm's m9 (imagenet.yaml)
    randaugment_magnitude_std: float = rule(
        0.0, ge=0, lt=float("inf")
    )  # > 0: magnitude ~ N(magnitude, std), clipped (timm's mstd)
    randaugment_op_prob: float = rule(1.0, ge=0, le=1)  # each chosen op is applied with this probability (timm 0.5)
    color_jitter: float = rule(0.0, ge=0)  # brightness = contrast = saturation; only when auto_augment is null (timm)
    random_erasing: float = rule(
        0.0, ge=0, le=1
    )  # probability; erased pixels get per-pixel normal noise (timm's "pixel")
    mixup_alpha: float = rule(0.0, ge=0)
    cutmix_alpha: float = rule(0.0, ge=0)
    mix_prob: float = rule(1.0, ge=0, le=1)  # probability that a batch is mixed at all (when an alpha > 0)
    mix_switch_prob: float = rule(0.5, ge=0, le=1)  # probability of CutMix rather than MixUp when both alphas > 0
    label_smoothing: float = rule(0.0, ge=0, lt=1)  # used by the trainer's loss, not here
    interpolation: str = rule("bilinear", choices=tuple(INTERPOLATIONS), what="interpolation")  # every resize and op
    eval_crop_ratio: float = rule(1.0, gt=0, le=1)  # eval: resize the short side to image_size / ratio, crop the center

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def interp(self) -> InterpolationMode:
        return INTERPOLATIONS[self.interpolation]


def aug_config(acfg: Any) -> AugConfig:
    """Parse and check cfg.aug (None or missing = no augmentation): the schema's rules, then those across keys."""
    if acfg is None:
        return AugConfig()
    node = typed(acfg, AugConfig, "aug.", keep_unknown=True)
    check_values(node, AugConfig, "aug.")
    a = OmegaConf.to_object(node)
    for key in ("crop_scale", "crop_ratio"):
        if getattr(a, key)[0] > getattr(a, key)[1]:
            raise UserError(f"aug.{key}={getattr(a, key)!r}: expected [low, high] with 0 < low <= high")
    if a.randaugment_magnitude >= a.randaugment_bins:
        raise UserError(
            f"aug.randaugment_magnitude={a.randaugment_magnitude}: must be in 0..randaugment_bins-1 "
            f"({a.randaugment_bins - 1})"
        )
    return a


# ----------------------------------------------------------------------------------------------------------------
# per-sample v2 pipelines


def photometric(a: AugConfig, mean: Sequence[float]) -> list:
    """uint8 -> uint8 per-sample colour/geometry policies: TrivialAugment, or ColorJitter. RandAugment is not here:
    it runs batched in the batch stage (batch_stage.py, batch_aug.py)."""
    fill = [round(255 * m) for m in mean]  # timm fills the geometric ops with the mean pixel
    # v2's affine ops on tensors know only nearest / bilinear: bicubic (timm's, through PIL) falls back to bilinear
    interp = InterpolationMode.BILINEAR if a.interp == InterpolationMode.BICUBIC else a.interp
    if a.auto_augment == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=interp, fill=fill)]
    if a.color_jitter > 0 and a.auto_augment is None:  # timm applies ColorJitter only without an auto-augment policy
        return [v2.ColorJitter(a.color_jitter, a.color_jitter, a.color_jitter)]
    return []


class TrainCrop:
    """The per-sample part of training augmentation for streamed files, uint8 in and out, run in the loader worker:
    the crop (RandomResizedCrop, or resize + center crop + padded random crop), the flip, and the per-sample
    photometric policies (TrivialAugment, ColorJitter; RandAugment runs batched in the batch stage). Draws from
    torch's global RNG, which the loader seeds per sample.

    RandomResizedCrop's box is drawn from the image's size alone (`box`), so a decoder that knows the size from the
    file's header can decode only what the crop needs (decode.py)."""

    def __init__(self, a: AugConfig, image_size: int, mean: Sequence[float]):
        s, self.size, self.interp, self.hflip = image_size, image_size, a.interp, a.hflip
        self.rrc = None
        if a.crop == "random_resized":
            self.rrc = v2.RandomResizedCrop(
                s, scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio), interpolation=a.interp, antialias=True
            )
            geo = []
        else:
            geo = [v2.Resize(s, interpolation=a.interp, antialias=True), v2.CenterCrop(s)]
            if a.crop == "pad_crop" and a.crop_padding > 0:
                geo.append(v2.RandomCrop(s, padding=a.crop_padding))
            if a.hflip > 0:
                geo.append(v2.RandomHorizontalFlip(a.hflip))
        self.geometry = v2.Compose(geo) if geo else None
        per_sample = photometric(a, mean)
        self.photometric = v2.Compose(per_sample) if per_sample else None

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop's (top, left, height, width) for an image of this size (v2's own draw)."""
        p = self.rrc.make_params([torch.empty(1, 1, 1).expand(3, height, width)])  # make_params reads only the size
        return p["top"], p["left"], p["height"], p["width"]

    def flip(self) -> bool:
        return self.hflip > 0 and bool(torch.rand(1) < self.hflip)  # v2.RandomHorizontalFlip's draw

    def crop_full(self, img: torch.Tensor) -> torch.Tensor:
        """A fully decoded image -> the training crop (and flip), as v2.RandomResizedCrop + RandomHorizontalFlip."""
        if self.rrc is None:
            return self.geometry(img)
        box, flip = self.box(*img.shape[1:]), self.flip()
        out = TF.resized_crop(img, *box, [self.size, self.size], interpolation=self.interp, antialias=True)
        return out.flip(-1) if flip else out


def eval_sample_transform(a: AugConfig, image_size: int) -> v2.Compose:
    """Resize the short side to image_size / eval_crop_ratio, center-crop image_size; uint8 (normalised later)."""
    return v2.Compose(
        [
            v2.Resize(int(image_size / a.eval_crop_ratio), interpolation=a.interp, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


# ----------------------------------------------------------------------------------------------------------------
# batched ops for in-memory data


def batch_crop_flip(x: torch.Tensor, padding: int, hflip: float, g: torch.Generator) -> torch.Tensor:
    """Per-sample random crop-with-zero-padding and horizontal flip of a uint8 batch (B, C, H, W), in one gather.

    Hand-written because v2.RandomCrop / RandomHorizontalFlip draw ONE set of parameters for a whole batch tensor;
    a per-sample loop of them costs ~50 us per image, this costs ~1 us."""
    b, c, h, w = x.shape
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    else:
        oy = ox = torch.zeros(b, dtype=torch.long)
    rows = oy[:, None] + ar_h  # (B, H)
    if hflip > 0:
        flip = torch.rand(b, generator=g) < hflip
        cols = ox[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (B, W): reversed columns = flipped
    else:
        cols = ox[:, None] + ar_w
    return x[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]  # (B, C, H, W)


def resize_batch(x: torch.Tensor, image_size: int, crop_ratio: float, interp: InterpolationMode) -> torch.Tensor:
    """Same-size batch -> short side image_size / crop_ratio, center crop image_size (no-op when already there)."""
    short = int(image_size / crop_ratio)
    if min(x.shape[-2:]) != short:
        x = TF.resize(x, [short], interpolation=interp, antialias=True)
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = TF.center_crop(x, [image_size, image_size])
    return x
