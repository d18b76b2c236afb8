"""The input pipeline of issue 12: uint8 batches from the workers, the batch stage (RandAugment, normalisation,
erasing, mixing) on the device or in the workers, DCT-scaled JPEG decoding, worker defaults, /dev/shm.

References are torchvision's own per-sample transforms, run independently here under the seeds the loader
documents (loader.py's contract), so "the same batch" means bit-identical to what the old float pipeline made.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import write_cifar10_python
from PIL import Image
from test_data import CLASSES, all_batches, folder_cfg, heavy_cifar_cfg, same
from torchvision.transforms import InterpolationMode, v2

from cvt_train.data import build_data, derive_seed
from cvt_train.data import decode as decode_mod
from cvt_train.data.batch_stage import BatchStage
from cvt_train.data.loader import TAG_MIX, TAG_SAMPLE, check_shared_memory
from cvt_train.data.sources import decode_file
from cvt_train.data.transforms import aug_config
from cvt_train.engine import allocation
from cvt_train.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
CUDA = torch.cuda.is_available()


def write_photos(root: Path, per_class: int, size=(96, 128), quality=92) -> None:
    """Smooth random colour fields as JPEGs: DCT scaling of smooth content is close to a resize of the full decode."""
    rng = np.random.default_rng(1)
    for cls in CLASSES:
        for split, n in (("train", per_class), ("test", 2)):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize(size[::-1], Image.BICUBIC)
                img.save(d / f"{k:03d}.jpg", quality=quality)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=40, n_test=20)


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write_photos(root, 6)
    return root


def photo_cfg(root, tmp_path, **over):
    return folder_cfg(root, tmp_path, "imagenet", in_memory=False, **{"data__image_size": 12, **over})


# ---------------------------------------------------------------------------------------------------------------
# uint8 transport: the same batches as the float pipeline


def test_uint8_batches_equal_the_float_pipeline(photo_root, tmp_path):
    """Workers ship uint8; normalisation and MixUp/CutMix on the device give exactly what per-sample v2
    (RandomResizedCrop, flip, ToDtype, Normalize) and v2.MixUp / v2.CutMix on the float batch give."""
    cfg = photo_cfg(
        photo_root,
        tmp_path,
        data__decode="full",
        data__augment_on="device",
        aug__auto_augment=None,
        aug__color_jitter=0.0,
        aug__random_erasing=0.0,
    )
    data = build_data(cfg)
    x0, *_ = next(iter(data._train_loader))
    assert x0.dtype == torch.uint8 and x0.shape == (4, 3, 12, 12)  # 432 bytes per image through shared memory
    a = aug_config(cfg.aug)
    per_sample = v2.Compose(
        [
            v2.RandomResizedCrop(12, tuple(a.crop_scale), tuple(a.crop_ratio), a.interp, antialias=True),
            v2.RandomHorizontalFlip(a.hflip),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(cfg.data.mean), list(cfg.data.std)),
        ]
    )
    mixup, cutmix = v2.MixUp(alpha=a.mixup_alpha, num_classes=3), v2.CutMix(alpha=a.cutmix_alpha, num_classes=3)
    batches = all_batches(data, epoch=1)
    mixed = set()
    for step, (x, y) in enumerate(batches):
        idx = data.order.batch(1, step).tolist()
        images = []
        for i in idx:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(derive_seed(0, 1, TAG_SAMPLE, i))
                images.append(per_sample(decode_file(data._train.paths[i])))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(0, 1, TAG_MIX, 0, step))
            assert torch.rand(()) < a.mix_prob
            op = cutmix if torch.rand(()) < a.mix_switch_prob else mixup
            ref, targets = op(torch.stack(images), data._train.labels[idx])
        mixed.add(type(op).__name__)
        assert torch.equal(x, ref) and torch.equal(y, targets.float())
    assert mixed == {"MixUp", "CutMix"}  # both kinds were compared


def test_eval_batches_equal_the_float_pipeline(photo_root, tmp_path):
    cfg = photo_cfg(photo_root, tmp_path)
    data = build_data(cfg)
    a = aug_config(cfg.aug)
    ref = v2.Compose(
        [
            v2.Resize(int(12 / a.eval_crop_ratio), interpolation=a.interp, antialias=True),
            v2.CenterCrop(12),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(cfg.data.mean), list(cfg.data.std)),
        ]
    )
    x = torch.cat([x for x, _ in data.val_batches()])
    expected = torch.stack([ref(decode_file(data._val.paths[i])) for i in data.val_local.tolist()])
    assert torch.equal(x, expected)


# ---------------------------------------------------------------------------------------------------------------
# where the batch stage runs does not change the batches


@pytest.mark.parametrize("workers", [0, 2])
def test_stage_on_device_equals_stage_in_workers_in_memory(cifar_root, workers):
    on_device = build_data(heavy_cifar_cfg(cifar_root, data__augment_on="device", data__num_workers=workers))
    in_workers = build_data(heavy_cifar_cfg(cifar_root, data__augment_on="workers", data__num_workers=0))
    full = all_batches(in_workers, epoch=2)
    assert same(all_batches(on_device, epoch=2), full)
    assert same(all_batches(on_device, epoch=2, start=3), full[3:])
    on_device.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_stage_on_device_equals_stage_in_workers_streamed(photo_root, tmp_path, workers):
    cfg = photo_cfg(photo_root, tmp_path, data__augment_on="device", data__num_workers=workers)
    on_device = build_data(cfg)
    cfg.data.augment_on, cfg.data.num_workers = "workers", 0
    full = all_batches(build_data(cfg), epoch=1)
    assert full[0][0].dtype == torch.float32 and full[0][1].shape == (4, 3)
    assert same(all_batches(on_device, epoch=1), full)
    assert same(all_batches(on_device, epoch=1, start=2), full[2:])
    on_device.close()


# ---------------------------------------------------------------------------------------------------------------
# the batch stage's erasing


def test_erasing_boxes_and_noise():
    a = aug_config({"name": "t", "random_erasing": 1.0})
    stage = BatchStage(a, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 10)
    x = torch.randint(0, 256, (64, 3, 16, 20), dtype=torch.uint8)
    plan = stage.plan(64, 16, 20, torch.Generator().manual_seed(3), 0, noise_seed=7)
    out, labels = stage(x, torch.arange(64) % 10, plan)
    plain = stage.normalize(x)
    changed = (out != plain).any(1)  # (B, H, W)
    boxes = dict(zip(plan.erase_index.tolist(), plan.erase_box.tolist()))
    assert len(boxes) >= 55  # p=1: all but the samples whose 10 attempts all failed
    for b in range(64):
        inside = torch.zeros(16, 20, dtype=torch.bool)
        if b in boxes:
            top, left, h, w = boxes[b]
            assert 0 <= top and top + h <= 16 and 0 <= left and left + w <= 20 and 0 < h < 16 and 0 < w < 20
            area = h * w / (16 * 20)
            assert 0.01 <= area <= 0.4  # v2's 0.02..0.33 of the image, up to rounding of h and w
            inside[top : top + h, left : left + w] = True
        assert not changed[b][~inside].any()  # nothing outside the box
        assert changed[b][inside].float().mean() > 0.9  # noise inside it
    again, _ = stage(x, torch.arange(64) % 10, plan)
    assert torch.equal(out, again)  # the noise comes from the plan's seed
    assert torch.equal(labels, torch.arange(64) % 10)


# ---------------------------------------------------------------------------------------------------------------
# DCT-scaled decoding


@pytest.mark.skipif(decode_mod.simplejpeg is None, reason="simplejpeg not installed (pip install 'cvt-train[fast]')")
def test_scaled_decode_draws_the_same_crops_and_decodes_less(photo_root, tmp_path, monkeypatch):
    shapes = []
    real = decode_mod.simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append(out.shape[:2])
        return out

    monkeypatch.setattr(decode_mod.simplejpeg, "decode_jpeg", spy)
    plain = dict(aug__auto_augment=None, aug__color_jitter=0.0, aug__random_erasing=0.0, aug__mixup_alpha=0.0)
    plain["aug__cutmix_alpha"] = 0.0
    plain["data__image_size"] = 24
    scaled = all_batches(build_data(photo_cfg(photo_root, tmp_path, data__decode="scaled", **plain)), epoch=0)
    full = all_batches(build_data(photo_cfg(photo_root, tmp_path, data__decode="full", **plain)), epoch=0)
    assert len(shapes) == 4 * len(scaled)  # every training image went through simplejpeg
    assert any(h < 96 for h, _ in shapes)  # and small crops of the 96x128 images were decoded at a smaller scale
    for (xs, ys), (xf, yf) in zip(scaled, full):
        assert torch.equal(ys, yf)
        # the same boxes: the crops differ by the decoder's downscaling and the box rounded to whole pixels of the
        # scaled image (<= 0.5 of 24: a shift of up to 2% of the crop here, 0.2% for 224 crops)
        assert (xs - xf).abs().mean() < 0.1, (xs - xf).abs().mean()


def test_decode_modes_refused_where_they_cannot_run(photo_root, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="data.decode=gpu needs a CUDA device"):
        build_data(photo_cfg(photo_root, tmp_path, data__decode="gpu"))
    monkeypatch.setattr(decode_mod, "simplejpeg", None)
    monkeypatch.setattr("cvt_train.data.loader.simplejpeg", None)
    with pytest.raises(UserError, match=r"data.decode=scaled needs simplejpeg: pip install 'cvt-train\[fast\]'"):
        build_data(photo_cfg(photo_root, tmp_path, data__decode="scaled"))
    with pytest.raises(UserError, match=r"data.decode=gpu needs simplejpeg"):  # (it reads the crops' sizes too)
        build_data(photo_cfg(photo_root, tmp_path, data__decode="gpu"))
    assert build_data(photo_cfg(photo_root, tmp_path)).decode == "full"  # auto without simplejpeg


@pytest.mark.skipif(not CUDA, reason="needs CUDA (nvJPEG)")
def test_gpu_decode_matches_cpu_decode(photo_root, tmp_path):
    plain = dict(aug__auto_augment=None, aug__color_jitter=0.0, aug__random_erasing=0.0, aug__mixup_alpha=0.0)
    gpu = build_data(photo_cfg(photo_root, tmp_path, data__decode="gpu", aug__cutmix_alpha=0.0, **plain), device="cuda")
    cpu = build_data(photo_cfg(photo_root, tmp_path, data__decode="full", aug__cutmix_alpha=0.0, **plain))
    for (xg, yg), (xc, yc) in zip(all_batches(gpu, epoch=0), all_batches(cpu, epoch=0)):
        assert xg.is_cuda and torch.equal(yg.cpu(), yc)
        assert (xg.cpu() - xc).abs().mean() < 0.05  # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches_but_erasing_noise(cifar_root):
    cuda = all_batches(build_data(heavy_cifar_cfg(cifar_root, aug__random_erasing=0.0), device="cuda"), epoch=1)
    cpu = all_batches(build_data(heavy_cifar_cfg(cifar_root, aug__random_erasing=0.0)), epoch=1)
    for (xg, yg), (xc, yc) in zip(cuda, cpu):
        assert xg.is_cuda and torch.allclose(xg.cpu(), xc, atol=1e-5) and torch.allclose(yg.cpu(), yc)


# ---------------------------------------------------------------------------------------------------------------
# defaults for a GPU node


def test_num_workers_from_the_cpus_of_this_rank(monkeypatch):
    monkeypatch.setattr(allocation.os, "sched_getaffinity", lambda _pid: set(range(16)))
    for var in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_ID"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert allocation.loader_workers(None, cuda)[0] == 15  # one CPU kept for the training process
    assert allocation.loader_workers(None, cpu)[0] == 1
    assert allocation.loader_workers(3, cuda) == (3, "data.num_workers")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun with 4 ranks on this node: 4 CPUs each
    assert allocation.loader_workers(None, cuda)[0] == 3
    monkeypatch.setattr(allocation.os, "sched_getaffinity", lambda _pid: set(range(256)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert allocation.loader_workers(None, cuda)[0] == allocation.MAX_AUTO_WORKERS
    monkeypatch.setattr(allocation.os, "sched_getaffinity", lambda _pid: {0})
    assert allocation.loader_workers(None, cpu)[0] == 0 and allocation.loader_workers(None, cuda)[0] == 1


def test_small_dev_shm_is_one_clear_line(monkeypatch, photo_root, tmp_path):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage._replace(free=64 * 2**20))
    check_shared_memory(2, 8 * 2**20)  # 32 MiB in flight: fits in 64
    with pytest.raises(UserError) as e:
        check_shared_memory(8, 38535168)  # 8 workers x 2 x 256 uint8 images of 224x224
    msg = str(e.value)
    assert "\n" not in msg and "/dev/shm has 64 MiB free" in msg and "need 588 MiB" in msg
    assert "--shm-size" in msg and "data.num_workers" in msg
    with pytest.raises(UserError, match="/dev/shm has 64 MiB free"):
        build_data(photo_cfg(photo_root, tmp_path, data__num_workers=2, data__batch_size=4, data__image_size=1024))


def test_interpolation_of_randaugment_geometry_stays_bilinear_for_bicubic_presets():
    stage = BatchStage(
        aug_config({"name": "t", "auto_augment": "randaugment", "interpolation": "bicubic"}), *[(0.5,) * 3] * 2, 10
    )
    assert stage.randaug.interpolation == InterpolationMode.BILINEAR
