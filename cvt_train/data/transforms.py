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

import math
from dataclasses import dataclass, field, fields
from typing import Any, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from ..errors import UserError

CROPS = ("random_resized", "pad_crop", "none")
AUTO_AUGMENTS = (None, "randaugment", "trivialaugment")
INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


@dataclass
class AugConfig:
    """The keys of every conf/aug/*.yaml (see those files for what each does)."""
    name: str = "none"
    crop: str = "none"                 # random_resized | pad_crop | none
    crop_padding: int = 4              # pad_crop: zero padding on each side before the random crop
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])     # random_resized: area range
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])  # random_resized: aspect range
    hflip: float = 0.0                 # probability of a horizontal flip
    auto_augment: Optional[str] = None  # null | randaugment | trivialaugment
    randaugment_num_ops: int = 2
    randaugment_magnitude: int = 9
    randaugment_bins: int = 11         # 11 bins: magnitude 9 = 0.9 of each op's range, as timm's m9 (imagenet.yaml)
    randaugment_magnitude_std: float = 0.0  # > 0: each op's magnitude ~ N(magnitude, std), clipped (timm's mstd)
    randaugment_op_prob: float = 1.0   # each chosen op is applied with this probability (timm: 0.5; torchvision: 1)
    color_jitter: float = 0.0          # brightness = contrast = saturation; only when auto_augment is null (timm)
    random_erasing: float = 0.0        # probability; erased pixels get per-pixel normal noise (timm's "pixel" mode)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0              # probability that a batch is mixed at all (when an alpha > 0)
    mix_switch_prob: float = 0.5       # probability of CutMix rather than MixUp when both alphas > 0
    label_smoothing: float = 0.0       # used by the trainer's loss, not here
    interpolation: str = "bilinear"    # bilinear | bicubic | nearest, for every resize / crop / RandAugment op
    eval_crop_ratio: float = 1.0       # eval: resize the short side to image_size / ratio, center-crop image_size

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def interp(self) -> InterpolationMode:
        return INTERPOLATIONS[self.interpolation]


def aug_config(acfg: Any) -> AugConfig:
    """Parse and check cfg.aug (None or missing = no augmentation)."""
    if acfg is None:
        return AugConfig()
    data = dict(acfg.items()) if hasattr(acfg, "items") else {}
    out = {}
    for f in fields(AugConfig):
        if f.name not in data:
            continue
        v = data[f.name]
        where = f"aug.{f.name}"
        if f.name == "hflip" and isinstance(v, bool):
            v = 0.5 if v else 0.0
        if f.name in ("crop_scale", "crop_ratio"):
            try:
                v = tuple(float(x) for x in v)
                assert len(v) == 2 and 0 < v[0] <= v[1]
            except Exception:
                raise UserError(f"{where}: expected [low, high] with 0 < low <= high, got {v!r}") from None
        elif f.name in ("auto_augment",):
            v = None if v in (None, "null", "none", "") else str(v)
        elif isinstance(f.default, bool) or isinstance(f.default, str):
            v = str(v)
        elif isinstance(f.default, int):
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"{where}: expected an integer, got {v!r}")
        elif isinstance(f.default, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f"{where}: expected a number, got {v!r}")
            v = float(v)
        out[f.name] = v
    a = AugConfig(**out)
    if a.crop not in CROPS:
        raise UserError(f"aug.crop={a.crop!r}: choose one of {list(CROPS)}")
    if a.auto_augment not in AUTO_AUGMENTS:
        raise UserError(f"aug.auto_augment={a.auto_augment!r}: choose null, randaugment or trivialaugment")
    if a.interpolation not in INTERPOLATIONS:
        raise UserError(f"aug.interpolation={a.interpolation!r}: choose one of {list(INTERPOLATIONS)}")
    for key in ("hflip", "random_erasing", "mix_prob", "mix_switch_prob", "randaugment_op_prob"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            raise UserError(f"aug.{key}={getattr(a, key)}: must be a probability in [0, 1]")
    for key in ("mixup_alpha", "cutmix_alpha", "color_jitter", "crop_padding"):
        if getattr(a, key) < 0:
            raise UserError(f"aug.{key}={getattr(a, key)}: must be >= 0")
    if not 0.0 <= a.label_smoothing < 1.0:
        raise UserError(f"aug.label_smoothing={a.label_smoothing}: must be in [0, 1)")
    if not 0.0 < a.eval_crop_ratio <= 1.0:
        raise UserError(f"aug.eval_crop_ratio={a.eval_crop_ratio}: must be in (0, 1]")
    if not (0.0 <= a.randaugment_magnitude_std and math.isfinite(a.randaugment_magnitude_std)):
        raise UserError(f"aug.randaugment_magnitude_std={a.randaugment_magnitude_std}: must be a finite number >= 0")
    if a.randaugment_bins < 2 or not 0 <= a.randaugment_magnitude < a.randaugment_bins:
        raise UserError(f"aug.randaugment_magnitude={a.randaugment_magnitude}: must be in 0..randaugment_bins-1 "
                        f"({a.randaugment_bins - 1})")
    return a


# ----------------------------------------------------------------------------------------------------------------
# per-sample v2 pipelines


class NoisyRandAugment(v2.RandAugment):
    """v2.RandAugment with a per-op magnitude ~ N(magnitude, std), clipped to 0..num_bins-1 (timm's magnitude_std),
    each op applied with probability `prob` (timm's 0.5).

    The parent runs one op per call on a 10x finer grid, so magnitude m maps to index round(10 m): the same fraction
    of each op's range as v2.RandAugment(magnitude=m, num_magnitude_bins=num_bins) for integer m. Draws from torch's
    global RNG (the loader seeds it per sample)."""

    STEPS = 10  # fine-grid steps per magnitude unit

    def __init__(self, num_ops: int, magnitude: float, num_bins: int, std: float, prob: float = 1.0, **kwargs):
        super().__init__(1, round(magnitude * self.STEPS), (num_bins - 1) * self.STEPS + 1, **kwargs)
        self.total_ops, self.magnitude_mean, self.magnitude_std = num_ops, float(magnitude), float(std)
        self.prob = float(prob)
        self.magnitude_max = float(num_bins - 1)

    def forward(self, *inputs: Any) -> Any:
        for _ in range(self.total_ops):
            if self.prob < 1.0 and float(torch.rand(())) >= self.prob:
                continue
            m = self.magnitude_mean + self.magnitude_std * float(torch.randn(()))
            m = min(max(m, 0.0), self.magnitude_max)
            self.magnitude = round(m * self.STEPS)
            out = super().forward(*inputs)
            inputs = out if len(inputs) > 1 else (out,)
        return inputs if len(inputs) > 1 else inputs[0]


def photometric(a: AugConfig, mean: Sequence[float]) -> list:
    """uint8 -> uint8 per-sample colour/geometry policies: RandAugment / TrivialAugment, or ColorJitter."""
    fill = [round(255 * m) for m in mean]  # timm fills RandAugment's rotate/shear/translate with the mean pixel
    # v2's affine ops on tensors know only nearest / bilinear: bicubic (timm's, through PIL) falls back to bilinear
    interp = InterpolationMode.BILINEAR if a.interp == InterpolationMode.BICUBIC else a.interp
    if a.auto_augment == "randaugment":
        # magnitude 9 of 11 bins = timm's m9 on its 0..10 scale; std > 0 adds timm's per-op noise ("mstd0.5")
        if a.randaugment_magnitude_std > 0 or a.randaugment_op_prob < 1:
            return [NoisyRandAugment(a.randaugment_num_ops, a.randaugment_magnitude, a.randaugment_bins,
                                     a.randaugment_magnitude_std, a.randaugment_op_prob, interpolation=interp,
                                     fill=fill)]
        return [v2.RandAugment(a.randaugment_num_ops, a.randaugment_magnitude, a.randaugment_bins,
                               interpolation=interp, fill=fill)]
    if a.auto_augment == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=interp, fill=fill)]
    if a.color_jitter > 0:  # timm (the official loader) applies ColorJitter only without an auto-augment policy
        return [v2.ColorJitter(a.color_jitter, a.color_jitter, a.color_jitter)]
    return []


def train_sample_transform(a: AugConfig, image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """A decoded file (uint8 (3, H, W), any size) -> float (3, image_size, image_size), normalised (streamed data)."""
    s = image_size
    if a.crop == "random_resized":
        geo = [v2.RandomResizedCrop(s, scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio), interpolation=a.interp,
                                    antialias=True)]
    else:
        geo = [v2.Resize(s, interpolation=a.interp, antialias=True), v2.CenterCrop(s)]
        if a.crop == "pad_crop" and a.crop_padding > 0:
            geo.append(v2.RandomCrop(s, padding=a.crop_padding))
    if a.hflip > 0:
        geo.append(v2.RandomHorizontalFlip(a.hflip))
    post = [v2.RandomErasing(a.random_erasing, value="random")] if a.random_erasing > 0 else []
    return v2.Compose([*geo, *photometric(a, mean), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
                       *post])


def eval_sample_transform(a: AugConfig, image_size: int, mean: Sequence[float],
                          std: Sequence[float]) -> v2.Compose:
    """Resize the short side to image_size / eval_crop_ratio, center-crop image_size, normalise (streamed data)."""
    return v2.Compose([v2.Resize(int(image_size / a.eval_crop_ratio), interpolation=a.interp, antialias=True),
                       v2.CenterCrop(image_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


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
    rows = oy[:, None] + ar_h                                            # (B, H)
    if hflip > 0:
        flip = torch.rand(b, generator=g) < hflip
        cols = ox[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (B, W): reversed columns = flipped
    else:
        cols = ox[:, None] + ar_w
    return x[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]             # (B, C, H, W)


def normalize_batch(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised; mean/std already scaled to 0..255 and shaped (1, 3, 1, 1)."""
    return (x.float() - mean) / std


def resize_batch(x: torch.Tensor, image_size: int, crop_ratio: float, interp: InterpolationMode) -> torch.Tensor:
    """Same-size batch -> short side image_size / crop_ratio, center crop image_size (no-op when already there)."""
    short = int(image_size / crop_ratio)
    if min(x.shape[-2:]) != short:
        x = TF.resize(x, [short], interpolation=interp, antialias=True)
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = TF.center_crop(x, [image_size, image_size])
    return x


class Mixer:
    """MixUp / CutMix switching on a normalised batch (v2.MixUp / v2.CutMix), always giving soft targets
    (B, num_classes) float32 when enabled, so the target type is the same for every batch."""

    def __init__(self, a: AugConfig, num_classes: int):
        self.a, self.num_classes = a, num_classes
        self.mixup = v2.MixUp(alpha=a.mixup_alpha, num_classes=num_classes) if a.mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=a.cutmix_alpha, num_classes=num_classes) if a.cutmix_alpha > 0 else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws from the default generator: call under fork_rng with a per-step seed."""
        if torch.rand(()) >= self.a.mix_prob:
            return images, F.one_hot(labels, self.num_classes).float()
        if self.mixup is not None and self.cutmix is not None:
            op = self.cutmix if torch.rand(()) < self.a.mix_switch_prob else self.mixup
        else:
            op = self.mixup or self.cutmix
        images, targets = op(images, labels)
        return images, targets.float()
