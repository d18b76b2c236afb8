"""The batch stage: the part of augmentation that works on whole uint8 batches, run where the batch is.

A loader worker makes each training batch as uint8 (B, 3, S, S) (decode, crop, flip; a quarter of float32's bytes
through shared memory and the host-to-device copy) and draws this stage's random parameters, a `BatchPlan`, on the
CPU from the batch's seeded generator. The stage then applies the plan in a few batched tensor ops:

    RandAugment (batch_aug.BatchRandAugment: each sample its own ops and magnitudes)
    -> float, normalise (v2.ToDtype(scale=True) + v2.Normalize's arithmetic, so equal to them bit for bit)
    -> RandomErasing (one box per erased sample, per-pixel normal noise)
    -> MixUp / CutMix (v2's parameters and arithmetic; targets become soft (B, num_classes))

data.augment_on says where: `device` (after the copy, on the training device: default on CUDA, where these ops cost
~nothing) or `workers` (inside the loader workers, on the CPU: default on CPU, so the training process keeps its
cores for the model). Since the plan is drawn on the CPU in either case, the batch is the same wherever the stage
runs, for any number of workers, and after a resume, with one exception: erasing's noise is drawn from a
generator of the device it runs on (seeded per batch), so on CUDA it differs from the CPU's. Its boxes do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

from .batch_aug import BatchRandAugment, RandAugParams
from .transforms import AugConfig

ERASE_SCALE, ERASE_LOG_RATIO = (0.02, 0.33), (math.log(0.3), math.log(3.3))  # v2.RandomErasing's defaults
ERASE_ATTEMPTS = 10


@dataclass
class BatchPlan:
    """One batch's random parameters for the batch stage: drawn on the CPU, and they stay there (the stage reads
    them as host values, and sends RandAugment's per-sample numbers to the device in pinned copies)."""

    randaug: RandAugParams | None = None
    erase_index: torch.Tensor | None = None  # int64 (n,): the samples that get a box
    erase_box: torch.Tensor | None = None  # int64 (n, 4): top, left, height, width
    noise_seed: int = 0
    mix: str = "none"  # none | onehot (mixing on, this batch not mixed) | mixup | cutmix
    lam: float = 1.0  # weight of the batch itself (cutmix: after the box is clipped)
    cut_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # cutmix: x1, y1, x2, y2


class BatchStage:
    """Draws (`plan`, on the CPU) and applies (`__call__`, on any device) the batch stage of an aug preset."""

    def __init__(self, a: AugConfig, mean, std, num_classes: int):
        self.a, self.num_classes = a, num_classes
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.randaug = None
        if a.auto_augment == "randaugment":
            # v2's affine ops on tensors know only nearest / bilinear: bicubic falls back to bilinear (as before)
            interp = InterpolationMode.BILINEAR if a.interp == InterpolationMode.BICUBIC else a.interp
            self.randaug = BatchRandAugment(
                a.randaugment_num_ops,
                a.randaugment_magnitude,
                a.randaugment_bins,
                a.randaugment_magnitude_std,
                a.randaugment_op_prob,
                interpolation=interp,
                fill=[round(255 * m) for m in self.mean],  # timm fills with the mean pixel
            )
        self.mixup = v2.MixUp(alpha=a.mixup_alpha, num_classes=num_classes) if a.mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=a.cutmix_alpha, num_classes=num_classes) if a.cutmix_alpha > 0 else None
        self._noise: dict[torch.device, torch.Generator] = {}
        self._mean_std: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def random(self) -> bool:
        """Whether a training batch needs a plan (anything random happens here)."""
        return self.randaug is not None or self.a.random_erasing > 0 or self.a.mixing

    # --- drawing (CPU)

    def plan(self, n: int, height: int, width: int, g: torch.Generator, mix_seed: int, noise_seed: int) -> BatchPlan:
        """All random choices for a batch of n images of height x width: RandAugment and erasing from `g`; mixing
        from torch's global generator seeded with mix_seed inside fork_rng (v2.MixUp / v2.CutMix draw from it)."""
        p = BatchPlan(noise_seed=noise_seed)
        if self.randaug is not None:
            p.randaug = self.randaug.draw(n, g)
        if self.a.random_erasing > 0:
            p.erase_index, p.erase_box = _erase_boxes(n, height, width, self.a.random_erasing, g)
        if self.a.mixing:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(mix_seed)
                p.mix, p.lam, p.cut_box = self._mix_params(n, height, width)
        return p

    def _mix_params(self, n: int, height: int, width: int) -> tuple[str, float, tuple[int, int, int, int]]:
        # the draws, and their order, of the per-batch MixUp / CutMix switch this pipeline has always made
        if torch.rand(()) >= self.a.mix_prob:
            return "onehot", 1.0, (0, 0, 0, 0)
        if self.mixup is not None and self.cutmix is not None:
            use_cutmix = bool(torch.rand(()) < self.a.mix_switch_prob)
        else:
            use_cutmix = self.mixup is None
        if not use_cutmix:
            return "mixup", self.mixup.make_params([])["lam"], (0, 0, 0, 0)
        shape_only = torch.empty(1, 1, 1, 1).expand(n, 3, height, width)  # make_params reads only the size
        params = self.cutmix.make_params([shape_only])
        return "cutmix", params["lam_adjusted"], params["box"]

    # --- applying (any device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32, the arithmetic of v2.ToDtype(float32, scale=True) then v2.Normalize."""
        if x.device not in self._mean_std:  # made once per device: a tensor from host data on CUDA waits for it
            self._mean_std[x.device] = tuple(
                torch.tensor(v, device=x.device).view(-1, 1, 1) for v in (self.mean, self.std)
            )
        mean, std = self._mean_std[x.device]
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for rows in _chunks(x):
            out[rows].copy_(x[rows]).mul_(1.0 / 255).sub_(mean).div_(std)
        return out

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, p: BatchPlan | None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch and int64 labels (on one device) and the batch's plan (on the CPU) -> (float32 images,
        targets: labels, or soft (B, num_classes) when mixing is on)."""
        if p is not None and p.randaug is not None:
            x = self.randaug.apply(x, p.randaug)
        x = self.normalize(x)
        if p is None:
            return x, labels
        if p.erase_box is not None and len(p.erase_box) > 0:
            self._erase(x, p)
        if p.mix == "none":
            return x, labels
        # one-hot by scatter: F.one_hot may check the labels' range on the host
        targets = torch.zeros(len(labels), self.num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)
        if p.mix == "mixup":  # v2.MixUp's arithmetic: the batch rolled by one is the partner
            mixed = torch.empty_like(x)
            for rows in _chunks(x):
                partner = x.index_select(0, (torch.arange(rows.start, rows.stop, device=x.device) - 1) % len(x))
                mixed[rows] = partner.mul_(1.0 - p.lam).add_(x[rows].mul(p.lam))
            x = mixed
        elif p.mix == "cutmix":  # v2.CutMix: the box comes from the partner; only the box is copied, in place
            x1, y1, x2, y2 = p.cut_box
            box = x[..., y1:y2, x1:x2]
            box.copy_(box.roll(1, 0))
        if p.mix != "onehot":
            targets = targets.roll(1, 0).mul_(1.0 - p.lam).add_(targets.mul(p.lam))
        return x, targets

    def _erase(self, x: torch.Tensor, p: BatchPlan) -> None:
        """Per-pixel normal noise into each box, in place; the boxes are host values (the plan stays on the CPU), so
        this is one small kernel per erased image and no wait for the device."""
        g = self._noise.get(x.device)
        if g is None:
            g = self._noise[x.device] = torch.Generator(device=x.device)
        g.manual_seed(p.noise_seed)
        for i, (top, left, h, w) in zip(p.erase_index.tolist(), p.erase_box.tolist()):
            x[i, :, top : top + h, left : left + w] = torch.randn((x.shape[1], h, w), generator=g, device=x.device)


def _chunks(x: torch.Tensor, target_bytes: int = 2**20) -> list[slice]:
    """Row ranges of ~1 MB of uint8 pixels on the CPU (the float temporaries of each then stay in cache: measured
    2-3x faster than whole-batch passes for 224-pixel batches), one range on an accelerator."""
    if x.device.type != "cpu":
        return [slice(0, len(x))]
    step = max(1, target_bytes // max(1, x[0].numel()))
    return [slice(i, min(i + step, len(x))) for i in range(0, len(x), step)]


def _erase_boxes(n: int, height: int, width: int, prob: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """v2.RandomErasing's box distribution for n samples at once: erase with probability prob; up to 10 attempts of
    area ~ U(0.02, 0.33) of the image and log aspect ~ U(log 0.3, log 3.3), the first that fits is used (none fits:
    no box). Returns (indices of the erased samples, their boxes (top, left, height, width))."""
    erase = torch.rand(n, generator=g) < prob
    area = height * width * torch.empty(n, ERASE_ATTEMPTS).uniform_(*ERASE_SCALE, generator=g)
    ratio = torch.exp(torch.empty(n, ERASE_ATTEMPTS).uniform_(*ERASE_LOG_RATIO, generator=g))
    h = torch.sqrt(area * ratio).round().long()
    w = torch.sqrt(area / ratio).round().long()
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = fits.int().argmax(1)  # the first attempt that fits
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    top = (torch.rand(n, generator=g) * (height - h + 1)).long()
    left = (torch.rand(n, generator=g) * (width - w + 1)).long()
    keep = erase & fits.any(1)
    index = keep.nonzero()[:, 0]
    return index, torch.stack([top, left, h, w], 1)[index]
