"""Data package: layouts, splits, reproducible batches (workers, resume, ranks), data faults, the digits set.

All data is generated here, tiny: a CIFAR-10 python-format folder and an image-folder tree of PNG/JPEG files. Each
image encodes its label in the red plane (10 + 24 label) and an id in the green plane (3 id), so tests can check
which image and label reached a batch.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cvt_train.config import check_group
from cvt_train.data import aug_config, build_data, derive_seed
from cvt_train.data.batch_aug import BatchRandAugment
from cvt_train.data.batch_stage import BatchStage
from cvt_train.data.transforms import batch_crop_flip, photometric
from cvt_train.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
CONF = Path(__file__).resolve().parents[1] / "cvt_train" / "conf"
CLASSES = ["cat", "dog", "frog"]


def make_cfg(data: str, aug: str = "none", cache: Path | None = None, **over):
    cfg = OmegaConf.create(
        {
            "data": OmegaConf.load(CONF / "data" / f"{data}.yaml"),
            "aug": OmegaConf.load(CONF / "aug" / f"{aug}.yaml"),
            "trainer": {"seed": 0},
        }
    )
    cfg.data.num_workers = 0
    if cache is not None:
        cfg.data.cache_dir = str(cache)
    for k, v in over.items():
        OmegaConf.update(cfg, k.replace("__", "."), v, merge=False)
    return cfg


def encoded(img: np.ndarray, label: int, ident: int) -> np.ndarray:
    img[0], img[1], img[2] = 10 + 24 * label, 3 * ident, 200  # spaced: JPEG-proof
    return img


def decode_ids(x: torch.Tensor, cfg) -> tuple[list[int], list[int]]:
    """(labels, ids) from normalised images whose pixels are constant per plane (no augmentation)."""
    mean = torch.tensor(list(cfg.data.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.data.std)).view(1, 3, 1, 1)
    px = ((x * std + mean) * 255).round()
    centre = px[:, :, px.shape[2] // 2, px.shape[3] // 2]
    return ((centre[:, 0] - 10) / 24).round().long().tolist(), (centre[:, 1] / 3).round().long().tolist()


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """cifar-10-batches-py with 5 x 8 training and 20 test images (32x32)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def batch(n: int, first: int) -> dict:
        labels = rng.integers(0, 10, n).tolist()
        data = np.stack(
            [encoded(np.zeros((3, 32, 32), np.uint8), lab, first + k).reshape(-1) for k, lab in enumerate(labels)]
        )
        return {"batch_label": "test", "labels": labels, "data": data, "filenames": [f"{k}.png" for k in range(n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(8, (i - 1) * 8), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(20, 0), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 8, "num_vis": 3072}, f)
    return root


def write_folder(root: Path, split: str, per_class: int, size: int = 16, first_id: int = 0) -> None:
    ident = first_id
    for label, cls in enumerate(CLASSES):
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            img = encoded(np.zeros((3, size, size), np.uint8), label, ident).transpose(1, 2, 0)
            ext = "jpg" if k == per_class - 1 else "png"  # mostly lossless PNG; one JPEG per class
            Image.fromarray(img).save(d / f"{k:03d}.{ext}", quality=95)
            ident += 1


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    """train/<3 classes>/ 12 images each, test/<3 classes>/ 4 each, 16x16."""
    root = tmp_path_factory.mktemp("folder")
    write_folder(root, "train", 12)
    write_folder(root, "test", 4, first_id=50)
    return root


def folder_cfg(root, tmp_path, aug="none", in_memory=True, **over):
    over = {
        "data__root": str(root),
        "data__num_classes": 3,
        "data__image_size": 16,
        "data__batch_size": 4,
        "data__in_memory": in_memory,
        **over,
    }
    return make_cfg("folder", aug, cache=tmp_path / "cache", **over)


def all_batches(data, epoch=0, start=0):
    return [(x.clone(), y.clone()) for x, y in data.train_batches(epoch, start)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------
# layouts


def test_cifar_python_format(cifar_root, tmp_path):
    cfg = make_cfg("cifar10", "none", data__root=str(cifar_root), data__batch_size=8)
    data = build_data(cfg)
    assert (data.num_classes, data.num_train, data.num_val, data.steps_per_epoch) == (10, 40, 20, 5)
    assert data.classes[0] == "airplane" and data.classes[9] == "truck" and data.in_memory
    test = pickle.load(open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb"))
    xs, ys = zip(*data.val_batches())
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    labels, ids = decode_ids(x, cfg)
    assert y.tolist() == test["labels"] == labels and ids == list(range(20))
    for x, y in data.train_batches(0):  # training images carry their own labels (no augmentation)
        assert decode_ids(x, cfg)[0] == y.tolist()
    # ROOT may also be the cifar-10-batches-py folder itself
    assert (
        build_data(make_cfg("cifar10", data__root=str(cifar_root / "cifar-10-batches-py"), data__batch_size=8)).num_val
        == 20
    )


@pytest.mark.parametrize("in_memory", [True, False])
def test_image_folder_layout(folder_root, tmp_path, in_memory):
    cfg = folder_cfg(folder_root, tmp_path, in_memory=in_memory)
    data = build_data(cfg)
    assert data.classes == CLASSES and (data.num_train, data.num_val, data.num_classes) == (36, 12, 3)
    assert data.in_memory == in_memory and data.steps_per_epoch == 9
    xs, ys = zip(*data.val_batches())
    labels, ids = decode_ids(torch.cat(xs), cfg)
    assert torch.cat(ys).tolist() == labels == [0] * 4 + [1] * 4 + [2] * 4 and ids == list(range(50, 62))
    seen = []
    for x, y in data.train_batches(1):
        lab, ident = decode_ids(x, cfg)
        assert lab == y.tolist()
        seen += ident
    assert sorted(seen) == list(range(36))  # every training image once per epoch
    data.close()


def test_in_memory_cache_is_reused(folder_root, tmp_path):
    cfg = folder_cfg(folder_root, tmp_path)
    a = build_data(cfg)
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))
    assert len(files) == 2  # train and test
    b = build_data(cfg)  # from the cache
    assert same(all_batches(a), all_batches(b))
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.pt")) == files


def test_val_split_and_subsets(cifar_root, folder_root, tmp_path):
    cfg = make_cfg("cifar10", data__root=str(cifar_root), data__batch_size=4, data__val_split=0.25)
    data = build_data(cfg)
    assert (data.num_train, data.num_val) == (30, 10)
    val_ids = sorted(decode_ids(torch.cat([x for x, _ in data.val_batches()]), cfg)[1])
    train_ids = sorted(i for x, _ in data.train_batches(0) for i in decode_ids(x, cfg)[1])
    assert not set(val_ids) & set(train_ids) and len(set(train_ids)) == 28  # 7 full batches of 4 out of 30
    cfg.trainer.seed = 123  # the held-out split does not depend on the training seed
    other = build_data(cfg)
    assert sorted(decode_ids(torch.cat([x for x, _ in other.val_batches()]), cfg)[1]) == val_ids

    cfg = make_cfg("cifar10", data__root=str(cifar_root), data__batch_size=4, data__train_subset=12, data__val_subset=6)
    data = build_data(cfg)
    assert (data.num_train, data.num_val, data.steps_per_epoch) == (12, 6, 3)
    ids = [sorted(decode_ids(torch.cat([x for x, _ in build_data(cfg).val_batches()]), cfg)[1]) for _ in range(2)]
    assert ids[0] == ids[1] and len(ids[0]) == 6 and ids[0] != list(range(6))  # a fixed shuffle, not the first 6
    # an image folder without test/ needs val_split; with it, it works
    root = tmp_path / "noval"
    write_folder(root, "train", 10, size=8)
    with pytest.raises(UserError, match=r"data.val_split=0.1"):
        build_data(folder_cfg(root, tmp_path, data__image_size=8))
    data = build_data(folder_cfg(root, tmp_path, data__image_size=8, data__val_split=0.1))
    assert (data.num_train, data.num_val) == (27, 3)


def test_folder_scan_hidden_nested_gif_and_faults(tmp_path):
    """torchvision's make_dataset with our differences: hidden entries left out, GIF accepted, one-line faults."""
    root = tmp_path / "scan"
    write_folder(root, "train", 2, size=8)
    write_folder(root, "test", 2, size=8, first_id=50)
    img = encoded(np.zeros((3, 8, 8), np.uint8), 1, 60).transpose(1, 2, 0)
    (root / "train" / "dog" / "sub").mkdir()
    Image.fromarray(img).save(root / "train" / "dog" / "sub" / "nested.png")  # sub-folders count, as in ImageFolder
    Image.fromarray(img).save(root / "train" / "dog" / "anim.gif")
    for hidden in (root / "train" / ".ipynb_checkpoints", root / "train" / "cat" / ".ipynb_checkpoints"):
        hidden.mkdir()
        Image.fromarray(img).save(hidden / "x-checkpoint.png")
    (root / "train" / "cat" / "._000.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "train" / "frog" / "notes.txt").write_text("not an image")
    for in_memory in (True, False):
        data = build_data(folder_cfg(root, tmp_path, in_memory=in_memory, data__image_size=8, data__batch_size=2))
        assert data.classes == CLASSES and data.num_train == 8
        ids = sorted(i for x, _ in data.train_batches(0) for i in decode_ids(x, folder_cfg(root, tmp_path))[1])
        assert ids == [0, 1, 2, 3, 4, 5, 60, 60]
    (root / "train" / "frog" / "000.png").unlink()
    (root / "train" / "frog" / "001.jpg").unlink()
    msg = one_line_error(folder_cfg(root, tmp_path, data__image_size=8), r"frog: class folder has no images")
    assert ".gif" in msg and ".png" in msg
    empty = tmp_path / "noclasses"
    (empty / "train" / ".ipynb_checkpoints").mkdir(parents=True)
    (empty / "test").mkdir()
    one_line_error(folder_cfg(empty, tmp_path), r"train: no class folders; expected train/<class>/<image files>")


def test_derive_seed_unrelated_neighbours():
    """63-bit, a pure function of the tuple, and different for neighbouring or ambiguous tuples."""
    tuples = [
        (),
        (0,),
        (0, 0),
        (0, 0, 0),
        (1,),
        (0, 1),
        (1, 0),
        (2**32,),
        (0, 1, 0),
        (-1,),
        (-1, 0),
        *[(0, e, 2, i) for e in range(3) for i in range(50)],
        *[(s, 0, 3, r, k) for s in range(3) for r in range(3) for k in range(3)],
    ]
    seeds = [derive_seed(*t) for t in tuples]
    assert seeds == [derive_seed(*t) for t in tuples] and all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(tuples)
    assert derive_seed(-1) == derive_seed(2**64 - 1)  # a part counts as its 64-bit two's complement
    assert derive_seed(np.int64(5), torch.tensor(1)) == derive_seed(5, 1)
    bits = np.array([bin(derive_seed(0, 0, 2, i) ^ derive_seed(0, 0, 2, i + 1)).count("1") for i in range(200)])
    assert 28 < bits.mean() < 35  # neighbours differ in about half of the 63 bits


def test_digits_embedded_set():
    cfg = make_cfg("digits", "digits")
    data = build_data(cfg)
    assert data.num_train + data.num_val == 1797 and data.num_val == 359 and data.classes == [str(i) for i in range(10)]
    x, y = next(iter(data.train_batches(0)))
    assert x.shape == (64, 3, 16, 16) and y.dtype == torch.long and 0 <= int(y.min()) <= int(y.max()) <= 9
    assert abs(float(torch.cat([x for x, _ in data.val_batches()]).mean())) < 0.2  # mean/std of the yaml fit the set


def test_cifar_bytes_keys_and_eval_only(tmp_path, cifar_root):
    """Pickles written by Python 3 with bytes keys (as some converters do) read the same; train=False skips train."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in (cifar_root / "cifar-10-batches-py").iterdir():
        obj = pickle.load(open(f, "rb"))
        obj = {k.encode(): ([c.encode() for c in v] if k == "label_names" else v) for k, v in obj.items()}
        pickle.dump(obj, open(folder / f.name, "wb"))
    cfg = make_cfg("cifar10", data__root=str(tmp_path), data__batch_size=8)
    data = build_data(cfg)
    assert data.classes[:2] == ["airplane", "automobile"] and (data.num_train, data.num_val) == (40, 20)
    (folder / "data_batch_1").unlink()  # eval only: the training files are not even opened
    data = build_data(cfg, train=False)
    assert (data.num_train, data.steps_per_epoch, data.num_val) == (0, 0, 20)
    assert sum(len(y) for _, y in data.val_batches()) == 20


# ---------------------------------------------------------------------------------------------------------------
# reproducibility


def heavy_cifar_cfg(root, **over):
    return make_cfg(
        "cifar10",
        "cifar",
        data__root=str(root),
        data__batch_size=8,
        aug__auto_augment="randaugment",
        aug__random_erasing=0.5,
        aug__mixup_alpha=0.8,
        aug__cutmix_alpha=1.0,
        aug__label_smoothing=0.1,
        **over,
    )


def test_determinism_in_memory(cifar_root):
    cfg = heavy_cifar_cfg(cifar_root)
    ref = build_data(cfg)
    rng_before = torch.get_rng_state()
    full = all_batches(ref, epoch=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the data never touches the model's RNG
    assert full[0][1].shape == (8, 10) and torch.allclose(full[0][1].sum(1), torch.ones(8))  # soft targets
    assert ref.soft_targets and ref.label_smoothing == 0.1
    torch.manual_seed(999)  # nor does the global RNG state change the batches
    assert same(all_batches(ref, epoch=3), full)
    assert same(all_batches(ref, epoch=3, start=2), full[2:])  # mid-epoch resume
    assert not torch.equal(all_batches(ref, epoch=4)[0][0], full[0][0])  # another epoch, other batches
    cfg.data.num_workers = 2
    workers = build_data(cfg)
    assert same(all_batches(workers, epoch=3), full)
    assert same(all_batches(workers, epoch=3, start=3), full[3:])
    workers.close()
    cfg.trainer.seed = 1
    assert not torch.equal(all_batches(build_data(cfg), epoch=3)[0][0], full[0][0])


def test_determinism_streamed(folder_root, tmp_path):
    cfg = folder_cfg(folder_root, tmp_path, "imagenet", in_memory=False, data__image_size=12)
    ref = build_data(cfg)
    rng_before = torch.get_rng_state()
    full = all_batches(ref, epoch=2)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert len(full) == 9 and full[0][0].shape == (4, 3, 12, 12) and full[0][1].shape == (4, 3)
    assert same(all_batches(ref, epoch=2, start=5), full[5:])
    cfg.data.num_workers = 2
    workers = build_data(cfg)
    assert same(all_batches(workers, epoch=2), full)
    assert same(all_batches(workers, epoch=2, start=7), full[7:])
    val = [x for x, _ in workers.val_batches()]
    assert torch.equal(torch.cat(val), torch.cat([x for x, _ in ref.val_batches()]))
    workers.close()


@pytest.mark.parametrize("kind", ["cifar", "folder"])
def test_distributed_sharding(cifar_root, folder_root, tmp_path, kind):
    if kind == "cifar":
        cfg = make_cfg("cifar10", data__root=str(cifar_root), data__batch_size=3)  # 20 val images: 10 per rank
    else:
        cfg = folder_cfg(folder_root, tmp_path, in_memory=False, data__batch_size=5, data__val_subset=11)
    single = torch.cat([x for x, _ in build_data(cfg).val_batches()])
    parts, train_ids = [], []
    for rank in range(2):
        data = build_data(cfg, rank=rank, world_size=2)
        parts.append(torch.cat([x for x, _ in data.val_batches()]))
        train_ids.append({i for x, _ in data.train_batches(0) for i in decode_ids(x, cfg)[1]})
    assert sorted(decode_ids(torch.cat(parts), cfg)[1]) == sorted(decode_ids(single, cfg)[1])  # each image once
    assert len(parts[0]) + len(parts[1]) == len(single)  # no padded duplicates
    assert not train_ids[0] & train_ids[1]  # the ranks train on disjoint samples


def test_batched_crop_flip_matches_reference():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = batch_crop_flip(x, 2, 0.5, g)
    g = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        ref = padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)
    assert torch.equal(batch_crop_flip(x, 0, 1.0, g), x.flip(-1))


# ---------------------------------------------------------------------------------------------------------------
# RandAugment magnitude noise (timm's mstd)


def test_randaugment_presets_build_the_batched_op():
    mean = (0.5, 0.5, 0.5)
    stage = BatchStage(aug_config(OmegaConf.create({"auto_augment": "randaugment"})), mean, mean, 10)
    r = stage.randaug
    assert (r.num_ops, r.magnitude, r.num_bins, r.magnitude_std, r.op_prob) == (2, 9, 11, 0.0, 1.0)
    assert photometric(aug_config(OmegaConf.create({"auto_augment": "randaugment"})), mean) == []  # not per sample
    r = BatchStage(aug_config(OmegaConf.load(CONF / "aug" / "imagenet.yaml")), mean, mean, 10).randaug
    assert (r.num_ops, r.magnitude, r.num_bins, r.magnitude_std, r.op_prob) == (2, 9, 11, 0.5, 0.5)  # timm's
    assert r.fill == [128.0] * 3  # the mean pixel
    for name in ("cifar", "digits", "none"):
        assert aug_config(OmegaConf.load(CONF / "aug" / f"{name}.yaml")).randaugment_magnitude_std == 0.0


def test_randaugment_noise_draws_clipped_magnitudes():
    """timm's mstd: each op's magnitude ~ N(9, 0.5) on the 0..10 scale, clipped; read back from Rotate's degrees."""
    g = torch.Generator().manual_seed(0)
    rotate = BatchRandAugment.OPS.index("Rotate")

    def levels(r: BatchRandAugment, n: int) -> torch.Tensor:
        p = r.draw(n, g)
        return (p.magnitude[p.op == rotate].abs().double() / 30 * 10), p.apply

    m, _ = levels(BatchRandAugment(2, 9, 11, 0.5), 20000)
    assert len(m) > 2000 and 0 <= m.min() and m.max() <= 10
    assert abs(float(m.mean()) - 9) < 0.05 and 0.35 < float(m.std()) < 0.6
    m, _ = levels(BatchRandAugment(1, 5, 11, 10.0), 20000)  # wide: both ends clip
    assert float(m.min()) == 0 and float(m.max()) == 10
    _, applied = levels(BatchRandAugment(2, 9, 11, 0.5, op_prob=0.5), 2000)  # timm's per-op probability
    assert 0.45 < float(applied.float().mean()) < 0.55


def test_randaugment_noise_in_memory_batches(cifar_root):
    ref = all_batches(build_data(heavy_cifar_cfg(cifar_root, aug__randaugment_magnitude_std=0.5)), epoch=1)
    again = all_batches(build_data(heavy_cifar_cfg(cifar_root, aug__randaugment_magnitude_std=0.5)), epoch=1)
    assert same(ref, again) and ref[0][0].shape == (8, 3, 32, 32)
    assert not torch.equal(all_batches(build_data(heavy_cifar_cfg(cifar_root)), epoch=1)[0][0], ref[0][0])


@pytest.mark.parametrize("bad", [-0.5, "wide", True, float("nan"), float("inf")])
def test_randaugment_std_faults(bad):
    with pytest.raises(UserError, match=r"aug\.randaugment_magnitude_std") as e:
        aug_config(OmegaConf.create({"auto_augment": "randaugment", "randaugment_magnitude_std": bad}))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# faults: one line, naming the key or file, saying what to do


def one_line_error(cfg, match: str) -> str:
    with pytest.raises(UserError, match=match) as e:
        data = build_data(cfg)
        for _ in data.train_batches(0):
            pass
        for _ in data.val_batches():
            pass
    assert "\n" not in str(e.value)
    return str(e.value)


def test_faults_roots_and_layouts(tmp_path, folder_root, cifar_root):
    one_line_error(make_cfg("cifar10", data__root=str(tmp_path / "nope")), r"data.root=.*nope: folder does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(make_cfg("cifar10", data__root=str(tmp_path / "empty")), r"folder is empty")
    (tmp_path / "odd" / "images").mkdir(parents=True)
    (tmp_path / "odd" / "images" / "a.png").write_bytes(b"x")
    one_line_error(make_cfg("imagenet", data__root=str(tmp_path / "odd")), r"no supported layout found")
    one_line_error(make_cfg("folder", data__num_classes=3), r"data.root is not set")  # root: ??? in folder.yaml
    one_line_error(make_cfg("folder", data__root=str(folder_root)), r"data.num_classes is not set.*=3")
    one_line_error(
        make_cfg("folder", data__root=str(folder_root / "train"), data__num_classes=3),
        r"split folder itself: use its parent",
    )
    one_line_error(
        make_cfg("cifar10", data__root=str(cifar_root), data__num_classes=100),
        r"data.num_classes=100 but .* has 10 classes .*set data.num_classes=10",
    )
    one_line_error(folder_cfg(folder_root, tmp_path, data__num_classes=5), r"has 3 classes")
    one_line_error(make_cfg("cifar10", data__root=str(cifar_root), data__batch_size=64), r"data.batch_size=64")
    one_line_error(make_cfg("digits", data__val_split=0), r"set data.val_split=0.2")
    one_line_error(make_cfg("digits", "cifar", aug__crop="zoom"), r"aug.crop='zoom'")
    with pytest.raises(UserError, match=r"^data.mean=\[0.5\]: expected 3 numbers"):  # the apps' validate checks it
        check_group(make_cfg("digits", data__mean=[0.5]), "data")
    # class folders differ between train and val
    root = tmp_path / "mismatch"
    write_folder(root, "train", 2, size=8)
    write_folder(root, "val", 2, size=8)
    os.rename(root / "val" / "frog", root / "val" / "toad")
    one_line_error(folder_cfg(root, tmp_path), r"class folders differ.*only in train/: frog; only in val/: toad")


def test_fault_hostile_or_truncated_cifar_pickle(tmp_path, cifar_root):
    import shutil

    root = tmp_path / "hostile"
    shutil.copytree(cifar_root, root)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(root / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    one_line_error(make_cfg("cifar10", data__root=str(root)), r"data_batch_2: refused")
    assert not marker.exists()
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(
        (cifar_root / "cifar-10-batches-py" / "data_batch_3").read_bytes()[:500]
    )
    one_line_error(make_cfg("cifar10", data__root=str(root)), r"data_batch_2: truncated or corrupt")


@pytest.mark.parametrize("in_memory,workers", [(True, 0), (False, 0), (False, 2)])
def test_fault_corrupt_image(tmp_path, in_memory, workers):
    root = tmp_path / "corrupt"
    write_folder(root, "train", 6, size=8)
    write_folder(root, "test", 2, size=8)
    bad = root / "train" / "dog" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    cfg = folder_cfg(
        root, tmp_path, in_memory=in_memory, data__image_size=8, data__num_workers=workers, data__batch_size=3
    )
    msg = one_line_error(cfg, r"002.png")  # named, with the way out; workers exit (no hang)
    assert str(bad) in msg and "data.skip_corrupt=true" in msg
    cfg.data.skip_corrupt = True
    with pytest.warns(UserWarning, match="002.png"):
        data = build_data(cfg)
        n = sum(len(y) for _, y in data.train_batches(0))
    assert len(data.skipped) == 1 and n == (15 if in_memory else 17)  # 17 of 18 images / 15 = 5 batches of 3 of 17
    data.close()
