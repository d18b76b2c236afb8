"""Batched RandAugment: a different random op and magnitude for every image of a uint8 batch, in a few tensor ops.

torchvision's v2.RandAugment (and the NoisyRandAugment this repo built on it) draws one op per call and so ran per
sample in the DataLoader workers; that Python loop is the input pipeline's bottleneck. Here `draw` takes all the
randomness of a batch from one CPU generator up front, and `apply` groups the samples of each op slot by op and runs
each op once on its sub-batch with per-sample magnitude tensors, on whatever device the batch lives on.

The op set, magnitude ranges, signed ops and per-op maths are torchvision v2's (torchvision/transforms/v2/
_auto_augment.py, functional/_color.py, functional/_geometry.py), reproduced so that every op gives the same pixels
as the torchvision functional applied to that sample alone with that magnitude (tests/test_batch_aug.py checks each
op bit for bit on CPU). Two details follow torchvision rather than intuition: ShearX/ShearY pivot on the top-left
corner (torchvision passes center=[0, 0], as the original AutoAugment code), and translations are truncated to
whole pixels (its int()).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# (name, signed, (value at bin 0, value at the last bin) or None for ops without a magnitude), in the order of
# v2.RandAugment._AUGMENTATION_SPACE. Units are torchvision's except translations, which are a fraction of the
# image's width / height because draw() does not know the image size (torchvision: 150/331 * size pixels).
_SPACE: tuple[tuple[str, bool, tuple[float, float] | None], ...] = (
    ("Identity", False, None),
    ("ShearX", True, (0.0, 0.3)),  # tan of the shear angle
    ("ShearY", True, (0.0, 0.3)),
    ("TranslateX", True, (0.0, 150.0 / 331.0)),  # fraction of the width
    ("TranslateY", True, (0.0, 150.0 / 331.0)),  # fraction of the height
    ("Rotate", True, (0.0, 30.0)),  # degrees, counter-clockwise
    ("Brightness", True, (0.0, 0.9)),  # blend factor - 1
    ("Color", True, (0.0, 0.9)),
    ("Contrast", True, (0.0, 0.9)),
    ("Sharpness", True, (0.0, 0.9)),
    ("Posterize", False, (8.0, 4.0)),  # bits kept, rounded to an integer
    ("Solarize", False, (1.0, 0.0)),  # threshold as a fraction of 255
    ("AutoContrast", False, None),
    ("Equalize", False, None),
)
_OP = {name: i for i, (name, _, _) in enumerate(_SPACE)}
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_CPU_CHUNK = 1 << 19  # uint8 elements per piece of a group on the CPU (see apply): three 224px images


def _inverse_affine_row(op: int, m: float, h: int, w: int) -> list[float]:
    """torchvision's _get_inverse_affine_matrix (scale 1) with the arguments v2.RandAugment passes for op and m."""
    sx = sy = angle = tx = ty = cx = cy = 0.0
    if op in (_OP["ShearX"], _OP["ShearY"]):
        # RandAugment passes shear = degrees(atan(m)) and affine takes radians() of it: keep both roundings
        shear = math.radians(math.degrees(math.atan(m)))
        sx, sy = (shear, 0.0) if op == _OP["ShearX"] else (0.0, shear)
        cx, cy = -0.5 * w, -0.5 * h  # center=[0, 0]: the top-left corner, measured from the image centre
    elif op == _OP["TranslateX"]:
        tx = float(int(m * w))  # whole pixels
    elif op == _OP["TranslateY"]:
        ty = float(int(m * h))
    elif op == _OP["Rotate"]:
        angle = -(m % 360.0)  # rotate() reduces the angle and negates it for the affine convention
    rot = math.radians(angle)
    # rotation after shear (determinant 1) ...
    cos_sy, tan_sx = math.cos(sy), math.tan(sx)
    a = math.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot - sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    # ... inverted, then the inverse translation and the centre shift around it: C * RSS^-1 * C^-1 * T^-1
    cxt, cyt = cx + tx, cy + ty
    return [d, -b, cx - d * cxt + b * cyt, -c, a, cy + c * cxt - a * cyt]


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor to device without waiting: from pinned memory, a CUDA copy is truly asynchronous (from pageable
    memory it would wait for the stream), and torch's pinned-memory cache keeps the buffer until the copy is done."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A contiguous uint8 batch as (B, row) of the widest integer type that divides a row: index_select and
    index_copy_ move whole rows that way, ~7x faster on the CPU than byte by byte."""
    t = t.contiguous().view(len(t), math.prod(t.shape[1:]))
    for dtype in (torch.int64, torch.int32, torch.int16):
        if t.shape[1] % dtype.itemsize == 0:
            return t.view(dtype)
    return t


def _to_uint8(t: torch.Tensor) -> torch.Tensor:
    """float in [0, 255] -> uint8, truncating as .to(torch.uint8); on the CPU through int16, ~3x faster there."""
    return t.to(torch.int16).to(torch.uint8) if t.device.type == "cpu" else t.to(torch.uint8)


@dataclass
class RandAugParams:
    """The random choices of one batch: CPU tensors of shape (B, num_ops), slot 0 applied before slot 1."""

    op: torch.Tensor  # int64 index into BatchRandAugment.OPS
    magnitude: torch.Tensor  # float32 signed magnitude in the op's units (see _SPACE); 0 for ops without one
    apply: torch.Tensor  # bool: False = the slot is skipped for this sample (op_prob < 1)


class BatchRandAugment:
    """RandAugment over a uint8 batch (B, 3, H, W) with per-sample ops, torchvision v2 semantics.

    Per sample and op slot: applied with probability `op_prob`; op uniform over OPS; magnitude bin `magnitude`, or
    with `magnitude_std` > 0 a continuous bin ~ N(magnitude, std) clipped to [0, num_bins - 1] (timm's mstd; the
    fraction of each op's range is used as is, where the per-sample NoisyRandAugment it replaced rounded it to a 10x finer grid);
    signed ops negated with probability 0.5. With std = 0 and an integer magnitude the values are exactly
    v2.RandAugment's (its float32 linspace tables)."""

    OPS: tuple[str, ...] = tuple(name for name, _, _ in _SPACE)

    def __init__(
        self,
        num_ops: int,
        magnitude: float,
        num_bins: int,
        magnitude_std: float = 0.0,
        op_prob: float = 1.0,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        fill: Sequence[int] = (0, 0, 0),
    ):
        if num_ops < 0 or num_bins < 2 or not 0 <= magnitude <= num_bins - 1:
            raise ValueError(
                f"need num_ops >= 0, num_bins >= 2, 0 <= magnitude <= num_bins - 1: {num_ops}, {num_bins}, {magnitude}"
            )
        if magnitude_std < 0 or not 0 <= op_prob <= 1:
            raise ValueError(f"need magnitude_std >= 0 and 0 <= op_prob <= 1, got {magnitude_std}, {op_prob}")
        # torchvision's tensor affine knows only these two
        if interpolation not in (InterpolationMode.NEAREST, InterpolationMode.BILINEAR):
            raise ValueError(f"interpolation must be NEAREST or BILINEAR, got {interpolation}")
        self.num_ops, self.magnitude, self.num_bins = int(num_ops), float(magnitude), int(num_bins)
        self.magnitude_std, self.op_prob = float(magnitude_std), float(op_prob)
        self.interpolation = interpolation
        self.fill = [float(f) for f in fill]
        if len(self.fill) not in (1, 3):
            raise ValueError(f"fill must have 1 or 3 values, got {fill}")

        self._signed = torch.tensor([s for _, s, _ in _SPACE])
        self._lo = torch.tensor([r[0] if r else 0.0 for _, _, r in _SPACE], dtype=torch.float64)
        self._hi = torch.tensor([r[1] if r else 0.0 for _, _, r in _SPACE], dtype=torch.float64)
        # Without noise every sample uses one bin: take the values from torchvision's own float32 tables, so that
        # they are bit-identical to v2.RandAugment's (a float64 formula can land one ulp away).
        self._table = None
        if self.magnitude_std == 0 and self.magnitude == int(self.magnitude):
            m, nb = int(self.magnitude), self.num_bins
            table = [float(torch.linspace(r[0], r[1], nb, dtype=torch.float32)[m]) if r else 0.0 for _, _, r in _SPACE]
            table[_OP["Posterize"]] = float((8 - (torch.arange(nb) / ((nb - 1) / 4))).round().int()[m])
            self._table = torch.tensor(table, dtype=torch.float32)
        # ops grouped for apply(): 0 = skip (Identity), 1 = the geometric ops in one grid pass, then one per other op
        self._groups = ["Identity", "geometric"] + [n for n in self.OPS if n not in _GEOMETRIC and n != "Identity"]
        self._group_of = torch.tensor(
            [1 if n in _GEOMETRIC else self._groups.index(n) for n in self.OPS], dtype=torch.int64
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, num_bins={self.num_bins}, "
            f"magnitude_std={self.magnitude_std}, op_prob={self.op_prob}, interpolation={self.interpolation.value}, "
            f"fill={self.fill})"
        )

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(len(x), g))

    # ------------------------------------------------------------------------------------------------------------
    # randomness

    def draw(self, n: int, g: torch.Generator) -> RandAugParams:
        """All random choices for n samples, from the CPU generator g only (torch's global RNG is not touched)."""
        shape = (n, self.num_ops)
        apply = torch.rand(shape, generator=g, dtype=torch.float32) < self.op_prob
        op = torch.randint(len(self.OPS), shape, generator=g)
        negate = torch.rand(shape, generator=g, dtype=torch.float32) < 0.5
        if self._table is not None:
            value = self._table[op].double()
        else:
            level = torch.full(shape, self.magnitude, dtype=torch.float64)
            if self.magnitude_std > 0:
                level += self.magnitude_std * torch.randn(shape, generator=g, dtype=torch.float64)
            frac = level.clamp_(0, self.num_bins - 1) / (self.num_bins - 1)
            lo, hi = self._lo[op], self._hi[op]
            value = lo + (hi - lo) * frac
            # Posterize keeps whole bits; torch.round is half-to-even as torchvision's table
            value = torch.where(op == _OP["Posterize"], value.round(), value)
        value = torch.where(self._signed[op] & negate, -value, value)
        return RandAugParams(op=op, magnitude=value.float(), apply=apply)

    # ------------------------------------------------------------------------------------------------------------
    # application

    def apply(self, x: torch.Tensor, p: RandAugParams) -> torch.Tensor:
        """uint8 (B, 3, H, W) on any device -> a new uint8 batch, same shape and device; x is not modified.

        The grouping by op is done on the CPU params, and every per-sample quantity (indices, blend factors,
        affine matrices) is computed there too and sent in two copies, so the device is never waited on."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        if p.op.shape != (len(x), self.num_ops):
            raise ValueError(f"params for shape {tuple(p.op.shape)}, batch of {len(x)} with {self.num_ops} ops")
        _, c, h, w = x.shape
        out = x.clone(memory_format=torch.contiguous_format)
        out_rows = _rows(out)

        # plan: (group, rows, per-sample params) for every slot and non-empty group, in application order
        plan = []
        for s in range(self.num_ops):
            rows = p.apply[:, s].nonzero().flatten()
            groups = self._group_of[p.op[rows, s]]
            order = groups.argsort(stable=True)
            rows, counts = rows[order], torch.bincount(groups, minlength=len(self._groups)).tolist()
            for gi, idx in enumerate(rows.split(counts)):
                if gi == 0 or len(idx) == 0:  # Identity, or an op no sample drew
                    continue
                plan.append((gi, idx, self._params(self._groups[gi], p.op[idx, s], p.magnitude[idx, s], h, w)))
        if not plan:
            return out

        # one host-to-device copy for the indices and one for the float params (the header holds fill and the
        # grid's scale, so that no kernel below creates a tensor from host data)
        header = torch.tensor([*self.fill, 0.5 * w, 0.5 * h], dtype=torch.float32)
        idx_all = _to(torch.cat([idx for _, idx, _ in plan]), x.device)
        par_all = _to(torch.cat([header] + [par.flatten() for _, _, par in plan]), x.device)
        fill, scale = par_all[: len(self.fill)].view(1, -1, 1, 1), par_all[len(self.fill) : len(header)]
        # On the CPU, work through a group in pieces of ~0.5 MB of pixels: the float temporaries of a whole 224px
        # group are tens of MB, which malloc maps afresh (page faults) for every op and which fall out of the
        # cache; in pieces the same ops run 2-8x faster. Accelerators take a group in one piece.
        chunk = max(1, _CPU_CHUNK // (c * h * w)) if x.device.type == "cpu" else len(x)
        base = None
        io, po = 0, len(header)
        for gi, _, par in plan:
            n, k = par.shape
            rows, par_d = idx_all[io : io + n], par_all[po : po + n * k].view(n, k)
            io, po = io + n, po + n * k
            name = self._groups[gi]
            for i in range(0, n, chunk):
                r, q = rows[i : i + chunk], par_d[i : i + chunk]
                sub = out_rows.index_select(0, r).view(torch.uint8).view(len(r), c, h, w)
                if name == "geometric":
                    base = self._base_grid(h, w, x.device) if base is None else base
                    res = self._affine(sub, q.view(len(r), 2, 3), base, fill, scale)
                else:
                    res = getattr(self, f"_{name.lower()}")(sub, q.view(len(r), k, 1, 1))
                # rows within a slot are disjoint, so writing back in place cannot disturb another group's input
                out_rows.index_copy_(0, r, _rows(res))
        return out

    def _params(self, group: str, op: torch.Tensor, mag: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Per-sample float32 params (n, k) of one group, computed on the CPU in float64 as torchvision does in
        Python floats, then rounded to float32 where torchvision's kernels round them."""
        m = mag.double()
        if group == "geometric":
            return self._inverse_affine(op, m, h, w)
        one = torch.ones_like(m)
        if group in ("Brightness", "Color", "Contrast"):
            # factor = 1 + m; _blend multiplies by float32(factor) and adds the other image times float32(1 - factor)
            return torch.stack([one + m, one - (one + m)], 1).float()
        if group == "Sharpness":
            return (one - (one + m)).float()[:, None]
        if group == "Posterize":
            bits = m.round().long()
            return ((255 << (8 - bits)) & 255).float()[:, None]  # keep the high `bits` bits
        if group == "Solarize":
            # torchvision compares the float32 pixel with float32(255 m): for integer pixels that is pixel >= its
            # ceil, which lets apply() compare uint8 with uint8
            return (255.0 * m).float().ceil()[:, None]
        return torch.zeros(len(m), 0, dtype=torch.float32)  # AutoContrast, Equalize: no parameter

    @staticmethod
    def _inverse_affine(op: torch.Tensor, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """float32 (n, 6) output-to-input matrices, one per sample, in pixels about the image centre.

        Computed per sample with Python's math, as torchvision does: torch's float64 sin/tan/atan differ from libm's
        in the last bit often enough to flip ~0.1% of the float32 matrices. A few microseconds a sample."""
        rows = [_inverse_affine_row(o, v, h, w) for o, v in zip(op.tolist(), m.tolist())]
        return torch.tensor(rows, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------------------------
    # ops on a sub-batch; p is the group's float32 params on the device, shaped (n, k, 1, 1) / (n, 2, 3)

    @staticmethod
    def _base_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
        """(1, H*W, 3) rows (x, y, 1): pixel centres in pixels from the image centre, as torchvision's _affine_grid."""
        f32 = dict(dtype=torch.float32, device=device)
        xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, **f32)
        ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, **f32)
        base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, **f32)], -1)
        return base.view(1, h * w, 3)

    def _affine(
        self, x: torch.Tensor, theta: torch.Tensor, base: torch.Tensor, fill: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """One grid_sample for every geometric op: torchvision's _affine_grid (the matrix applied to the pixel
        grid, then normalised by the half size) and _apply_grid_transform (a ones channel sampled along, to blend
        in `fill` where the source falls outside), with the same float32 operations."""
        n, c, h, w = x.shape
        grid = base.expand(n, -1, -1).bmm(theta.transpose(1, 2) / scale).view(n, h, w, 2)
        img = torch.empty(n, c + 1, h, w, dtype=torch.float32, device=x.device)
        img[:, :c] = x
        img[:, c] = 1.0
        mode = self.interpolation.value
        img = F.grid_sample(img, grid, mode=mode, padding_mode="zeros", align_corners=False)
        img, mask = img[:, :c], img[:, c:]
        if mode == "nearest":
            img = torch.where(mask < 0.5, fill, img)
        else:  # mask * (img - fill) + fill, the same three roundings as torchvision
            img = img.sub(fill).mul_(mask).add_(fill)
        return _to_uint8(img.round_())

    @staticmethod
    def _gray(x: torch.Tensor) -> torch.Tensor:
        """torchvision's rgb_to_grayscale in float32, floored as its uint8 paths do: (n, 1, H, W)."""
        return x[:, 0].mul(0.2989).add_(x[:, 1], alpha=0.587).add_(x[:, 2], alpha=0.114).floor_().unsqueeze(1)

    @staticmethod
    def _blend(x: torch.Tensor, other: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """x * ratio + other * (1 - ratio), clamped, truncated to uint8. torchvision's `add_(other, alpha=...)` is a
        fused multiply-add; addcmul with a per-sample alpha tensor rounds the same way (the tests check it)."""
        ratio, alpha = p[:, :1], p[:, 1:2]
        return _to_uint8(torch.addcmul(x.mul(ratio), other, alpha).clamp_(0, 255))

    def _brightness(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return _to_uint8(x.mul(p[:, :1]).clamp_(0, 255))  # blend with black = a plain multiply

    def _color(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self._blend(x, self._gray(x), p)

    def _contrast(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # the grey mean is a sum of integers, exact in float32 up to 65793 pixels, so any summation order agrees
        return self._blend(x, self._gray(x).mean(dim=(1, 2, 3), keepdim=True), p)

    def _sharpness(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if h <= 2 or w <= 2:  # torchvision returns such images unchanged
            return x
        out = x.float()
        # torchvision blurs with a float32 conv of weights 1/13 around 5/13 and rounds. The exact blur is
        # (3x3 sum + 4 * centre) / 13, never within 1/26 of a half, so summing the integers exactly and dividing
        # once rounds to the same values, several times faster than a depthwise conv on the CPU.
        rows = out[:, :, :-2] + out[:, :, 1:-1] + out[:, :, 2:]
        inner = out[:, :, 1:-1, 1:-1]  # the border keeps the original pixels
        blurred = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4.0).div_(13.0).round_()
        inner.copy_(torch.addcmul(inner, blurred.sub_(inner), p[:, :1]))
        return _to_uint8(out.clamp_(0, 255))

    def _posterize(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return x.bitwise_and(p[:, :1].to(torch.uint8))

    def _solarize(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= p[:, :1].to(torch.uint8), x.bitwise_not(), x)

    def _autocontrast(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # torchvision's autocontrast is batch-correct, but its boolean-mask assignments would wait on a GPU:
        # the same float32 operations with torch.where instead
        xf = x.float()
        low, high = xf.amin(dim=(2, 3), keepdim=True), xf.amax(dim=(2, 3), keepdim=True)
        flat = high == low  # such a channel is left as it is
        inv_scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255.0))
        low = torch.where(flat, 0.0, low)
        return _to_uint8(xf.sub_(low).div_(inv_scale).clamp_(0, 255))

    def _equalize(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return TF.equalize(x)  # per image and channel histograms over (H, W): batch-correct as it is
