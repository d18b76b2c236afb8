"""BatchRandAugment (cvt_train/data/batch_aug.py) against torchvision v2 applied one sample at a time."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from cvt_train.data.batch_aug import BatchRandAugment, RandAugParams

OPS = BatchRandAugment.OPS
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
PHOTOMETRIC = tuple(op for op in OPS if op not in GEOMETRIC)
FILL = (124, 116, 104)  # an ImageNet-mean fill, so that filled pixels are visible and not 0
NEAREST, BILINEAR = InterpolationMode.NEAREST, InterpolationMode.BILINEAR


def reference(img: torch.Tensor, op: str, m: float, interp: InterpolationMode = BILINEAR) -> torch.Tensor:
    """One sample through torchvision's public functionals, with the arguments v2.RandAugment passes for (op, m)
    (its _apply_image_or_video_transform; translations converted from our fraction-of-size units to pixels)."""
    h, w = img.shape[-2:]
    fill = list(FILL)
    if op == "Identity":
        return img
    if op in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(m)), 0.0] if op == "ShearX" else [0.0, math.degrees(math.atan(m))]
        return TF.affine(img, 0.0, [0, 0], 1.0, shear, interpolation=interp, fill=fill, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        t = [int(m * w), 0] if op == "TranslateX" else [0, int(m * h)]
        return TF.affine(img, 0.0, t, 1.0, [0.0, 0.0], interpolation=interp, fill=fill)
    if op == "Rotate":
        return TF.rotate(img, m, interpolation=interp, fill=fill)
    photometric = {
        "Brightness": lambda: TF.adjust_brightness(img, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(img, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(img, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + m),
        "Posterize": lambda: TF.posterize(img, int(m)),
        "Solarize": lambda: TF.solarize(img, 255.0 * m),
        "AutoContrast": lambda: TF.autocontrast(img),
        "Equalize": lambda: TF.equalize(img),
    }
    return photometric[op]()


def images(b: int = 8, h: int = 24, w: int = 20, seed: int = 0) -> torch.Tensor:
    """Noisy gradients, plus a flat image (AutoContrast's max == min and Equalize's step == 0 branches)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, w).expand(h, w)
    x = (ramp + 60 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
    x[1:2] = 93
    return x


def dots(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Dark dots on every other pixel of a bright background: pixel-minus-blur differences of ~100, where the
    bin values' products with the difference land next to integers (see test_blends_at_every_bin)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(150, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    x[:, :, ::2, ::2] = torch.randint(0, 101, x[:, :, ::2, ::2].shape, generator=g, dtype=torch.uint8)
    return x


def magnitudes(aug: BatchRandAugment, op: str, n: int, seed: int = 0) -> torch.Tensor:
    """n magnitudes of op as draw() makes them, with broad noise so that both signs, both clipped ends and values
    between bins occur; the second one is 0 (Rotate's angle-0 fast path, Solarize at 255...)."""
    g = torch.Generator().manual_seed(seed)
    p = aug.draw(60 * n, g)
    m = p.magnitude[p.op == OPS.index(op)][:n].clone()
    assert len(m) == n
    m[1] = 0.0 if op != "Posterize" else 8.0
    return m


def single_slot(op: str, mag: torch.Tensor) -> RandAugParams:
    n = len(mag)
    return RandAugParams(
        op=torch.full((n, 1), OPS.index(op)), magnitude=mag[:, None].float(), apply=torch.ones(n, 1, dtype=torch.bool)
    )


@pytest.mark.parametrize(
    "op, interp",
    [(op, BILINEAR) for op in OPS] + [(op, NEAREST) for op in GEOMETRIC],
)
def test_each_op_equals_torchvision_per_sample(op, interp):
    # Exact for every op, the geometric ones included: the affine matrices are computed with Python's math as
    # torchvision does, and the grid, the mask channel and the fill blend repeat its float32 operations.
    x = images()
    aug = BatchRandAugment(1, 5, 11, magnitude_std=4.0, interpolation=interp, fill=FILL)
    mag = magnitudes(aug, op, len(x))
    out = aug.apply(x, single_slot(op, mag))
    expected = torch.stack([reference(x[i], op, float(mag[i]), interp) for i in range(len(x))])
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, expected), (out.int() - expected.int()).abs().max()


@pytest.mark.parametrize("op", ["ShearX", "TranslateY", "Rotate", "Sharpness"])
def test_odd_sized_and_bin_magnitudes(op):
    # the table path (std 0, integer bin) with both signs, on a size where the centre is between pixels
    x = images(b=4, h=17, w=11, seed=1)
    aug = BatchRandAugment(1, 9, 11, fill=FILL)
    p = aug.draw(200, torch.Generator().manual_seed(0))
    value = p.magnitude[p.op == OPS.index(op)].abs().max()
    mag = torch.tensor([1.0, -1.0, 1.0, -1.0]) * value
    out = aug.apply(x, single_slot(op, mag))
    assert torch.equal(out, torch.stack([reference(x[i], op, float(mag[i])) for i in range(4)]))


@pytest.mark.parametrize("op", ["Brightness", "Color", "Contrast", "Sharpness", "Solarize"])
def test_blends_at_every_bin(op):
    # Bin values like float32(0.81) times a pixel difference of 100 land a hair off an integer, where a
    # non-fused multiply-add truncates to a different uint8 than torchvision's fused add_(alpha=...).
    values = v2.RandAugment._AUGMENTATION_SPACE[op][0](11, 1, 1)
    mag = torch.cat([values, -values]) if op != "Solarize" else values
    x = torch.cat([images(b=len(mag), h=32, w=32, seed=3), dots(len(mag), 32, 32)])
    mag = torch.cat([mag, mag])
    out = BatchRandAugment(1, 9, 11).apply(x, single_slot(op, mag))
    assert torch.equal(out, torch.stack([reference(x[i], op, float(mag[i])) for i in range(len(mag))]))


def test_sharpness_rounds_as_torchvision():
    # Blur 182 around an 82 with factor 1.81: 82 - float32(0.81) * 100 = 0.99999976, which truncates to 0 when
    # fused (torchvision's add_(alpha=...)) and to 1 when the product is rounded on its own first.
    x = torch.tensor([[244, 245, 244], [245, 82, 245], [244, 245, 244]], dtype=torch.uint8).expand(1, 3, 3, 3)
    m = float(v2.RandAugment._AUGMENTATION_SPACE["Sharpness"][0](11, 1, 1)[9])
    out = BatchRandAugment(1, 9, 11).apply(x, single_slot("Sharpness", torch.tensor([m])))
    assert torch.equal(out[0], reference(x[0], "Sharpness", m)) and out[0, 0, 1, 1] == 0


def test_reference_is_what_randaugment_does():
    # guards the reference above against torchvision's own op dispatch (a private method: skipped if renamed)
    ra = v2.RandAugment(interpolation=BILINEAR, fill=list(FILL))
    if not hasattr(ra, "_apply_image_or_video_transform"):
        pytest.skip("torchvision changed RandAugment's internals")
    img = images(b=1)[0]
    h, w = img.shape[-2:]
    for op, m in [("ShearX", -0.21), ("ShearY", 0.13), ("TranslateX", -0.37), ("TranslateY", 0.29), ("Rotate", -17.5)]:
        tv_m = m * w if op == "TranslateX" else m * h if op == "TranslateY" else m  # torchvision: pixels
        got = ra._apply_image_or_video_transform(img, op, tv_m, interpolation=BILINEAR, fill=ra._fill)
        assert torch.equal(got, reference(img, op, m)), op


def test_op_space_matches_torchvision():
    # names and order, signed ops and, with std 0, the magnitude tables (bit for bit, translations up to units)
    space = v2.RandAugment._AUGMENTATION_SPACE
    assert OPS == tuple(space)
    h, w, nb, m = 24, 20, 11, 7
    aug = BatchRandAugment(1, m, nb)
    p = aug.draw(4000, torch.Generator().manual_seed(0))
    op, mag = p.op.flatten(), p.magnitude.flatten()
    for k, name in enumerate(OPS):
        fn, signed = space[name]
        table = fn(nb, h, w)
        got = mag[op == k]
        if table is None:
            assert (got == 0).all(), name
            continue
        want = float(table[m])
        if name in ("TranslateX", "TranslateY"):
            size = w if name == "TranslateX" else h
            assert torch.allclose(got.abs() * size, torch.tensor(abs(want)), rtol=1e-6), name
        else:
            assert (got.abs() == abs(want)).all(), name
        assert bool((got < 0).any()) == signed, name


def test_two_slots_apply_in_order():
    x = images(b=16, seed=2)
    aug = BatchRandAugment(2, 9, 11, magnitude_std=0.5, fill=FILL)
    p = aug.draw(len(x), torch.Generator().manual_seed(3))
    p.op[:4, 0], p.op[:4, 1] = OPS.index("Rotate"), OPS.index("Solarize")  # an order that matters
    p.magnitude[:4, 0], p.magnitude[:4, 1] = 20.0, 0.5
    out = aug.apply(x, p)
    for i in range(len(x)):
        y = x[i]
        for s in range(2):
            y = reference(y, OPS[p.op[i, s]], float(p.magnitude[i, s]))
        assert torch.equal(out[i], y), i


def test_skipped_slots_return_the_input_and_input_is_not_modified():
    x = images()
    before = x.clone()
    aug = BatchRandAugment(2, 9, 11)
    p = aug.draw(len(x), torch.Generator().manual_seed(0))
    p.apply[:] = False
    assert torch.equal(aug.apply(x, p), x)
    p.apply[:], p.op[:], p.magnitude[:] = True, OPS.index("Solarize"), 0.5
    assert not torch.equal(aug.apply(x, p), x)
    assert torch.equal(x, before)


def test_draw_is_deterministic_and_distributed_as_randaugment():
    aug = BatchRandAugment(2, 9, 11, magnitude_std=0.5, op_prob=0.5)
    p = aug.draw(7000, torch.Generator().manual_seed(0))
    q = aug.draw(7000, torch.Generator().manual_seed(0))
    assert torch.equal(p.op, q.op) and torch.equal(p.magnitude, q.magnitude) and torch.equal(p.apply, q.apply)
    assert p.op.shape == p.magnitude.shape == p.apply.shape == (7000, 2)
    assert p.op.dtype == torch.int64 and p.magnitude.dtype == torch.float32 and p.apply.dtype == torch.bool

    counts = torch.bincount(p.op.flatten(), minlength=len(OPS))  # 1000 expected each, sd ~30
    assert counts.min() > 850 and counts.max() < 1150, counts
    assert 0.47 < p.apply.float().mean() < 0.53
    # each magnitude within its op's range (noise clipped to the bins), signed ops with both signs about equally
    space = v2.RandAugment._AUGMENTATION_SPACE
    for k, name in enumerate(OPS):
        mag = p.magnitude[p.op == k]
        fn, signed = space[name]
        table = fn(11, 1, 1)  # translations are fractions of the size: range 150/331 at size 1
        if table is None:
            assert (mag == 0).all()
            continue
        lo, hi = float(table.min()), float(table.max())
        if signed:
            assert (mag.abs() <= hi + 1e-6).all(), name
            assert 0.4 < (mag < 0).float().mean() < 0.6, name
        else:
            assert ((mag >= lo - 1e-6) & (mag <= hi + 1e-6)).all(), name
    posterize = p.magnitude[p.op == OPS.index("Posterize")]
    assert (posterize == posterize.round()).all() and set(posterize.tolist()) <= {4.0, 5.0, 6.0, 7.0, 8.0}
    # the noise spreads magnitudes around bin 9 (0.81 of Brightness's 0.9), mostly within a bin or so
    brightness = p.magnitude[p.op == OPS.index("Brightness")].abs()
    assert 0.75 < brightness.median() < 0.87 and brightness.std() > 0.02

    no_noise = BatchRandAugment(2, 9, 11, op_prob=1.0).draw(500, torch.Generator().manual_seed(1))
    assert no_noise.apply.all()


def test_global_rng_untouched_and_missing_ops():
    x = images(b=3)
    aug = BatchRandAugment(1, 9, 11, magnitude_std=0.5, op_prob=0.5, fill=FILL)
    state = torch.get_rng_state()
    aug(x, torch.Generator().manual_seed(0))
    p = single_slot("Rotate", torch.tensor([10.0, -5.0, 0.0]))
    p.op[1, 0], p.op[2, 0] = OPS.index("Identity"), OPS.index("Equalize")  # 11 of 14 ops have no sample
    out = aug.apply(x, p)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out[0], reference(x[0], "Rotate", 10.0))
    assert torch.equal(out[1], x[1]) and torch.equal(out[2], TF.equalize(x[2]))
    empty = aug(x[:0], torch.Generator().manual_seed(0))
    assert empty.shape == (0, 3, 24, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = images(b=64, h=40, w=36, seed=4)
    for interp in (BILINEAR, NEAREST):
        aug = BatchRandAugment(2, 9, 11, magnitude_std=0.5, op_prob=0.8, interpolation=interp, fill=FILL)
        p = aug.draw(len(x), torch.Generator().manual_seed(5))
        photometric = torch.isin(p.op, torch.tensor([OPS.index(op) for op in PHOTOMETRIC])).all(1)
        cpu, gpu = aug.apply(x, p), aug.apply(x.cuda(), p).cpu()
        assert torch.equal(cpu[photometric], gpu[photometric])
        # geometric samples: grid coordinates may differ by float rounding between devices, which moves a
        # bilinear value by at most 1 or picks the neighbouring pixel at a nearest tie: only a few pixels
        diff = (cpu.int() - gpu.int()).abs()
        assert (diff > 1).float().mean() < 0.01, interp
