"""Batches for the trainer: `build_data(cfg, rank, world_size, device)` -> `Data`.

Reproducibility contract: the training batches of epoch e (which samples, in which order, and every random
augmentation choice including MixUp/CutMix) are a pure function of (trainer.seed, e, rank, world_size):
    order          a permutation from a generator seeded with (seed, epoch); rank r takes every world_size-th entry
    per-sample ops seeded with (seed, epoch, sample index) inside torch.random.fork_rng (crop, flip, TrivialAugment)
    batch ops      seeded with (seed, epoch, rank, step): batched crop/flip, RandAugment and erasing from a
                   torch.Generator, mixing under fork_rng; all drawn on the CPU (erasing's noise: see batch_stage.py)
So the batches do not depend on num_workers, on which worker made them, or on where an epoch was (re)started, and
the data pipeline never draws from or changes the global RNG the model's dropout uses (the DataLoader gets its own
generator, since it would otherwise draw a base seed from the global RNG on every iter()).

Two paths, one batch format:
    in memory (CIFAR, digits, data.in_memory=true): the dataset is a uint8 tensor; one DataLoader item is one whole
        batch (gather by index, batched crop+flip, per-sample size-changing crop if any, resize if needed), made in
        workers when num_workers > 0 (fork shares the tensor copy-on-write).
    streamed (ImageNet, folders, shards): one item is one file, read and decoded (decode.py: at the smallest DCT
        scale its crop allows), cropped and flipped in a DataLoader worker; the collate function stacks them.
Either way a worker hands over a uint8 batch and the random parameters of the batch stage (batch_stage.py:
RandAugment, normalisation, erasing, mixing), which runs on the training device after the copy (data.augment_on).
On CUDA the copy of the next batch runs on a side stream while the current step computes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from ..engine.allocation import loader_workers
from ..errors import UserError
from .batch_stage import BatchPlan, BatchStage
from .decode import CorruptImage, decode_bytes, decode_crop_scaled, decode_on_gpu, jpeg_size, read_bytes, simplejpeg
from .sources import Source, Split, load_source
from .transforms import (
    AugConfig,
    TrainCrop,
    aug_config,
    batch_crop_flip,
    eval_sample_transform,
    photometric,
    resize_batch,
)

log = logging.getLogger(__name__)

SPLIT_SEED = 0  # fixed: val_split / subsets never depend on trainer.seed, so a checkpoint is evaluated on its split
_M64 = (1 << 64) - 1  # a part is hashed as its 64-bit two's complement (negative seeds work)
TAG_ORDER, TAG_SAMPLE, TAG_BATCH, TAG_ERASE, TAG_MIX = 1, 2, 3, 4, 5


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (numpy's SeedSequence): neighbouring tuples give unrelated
    streams. Each part is one fixed-width uint64 and the count comes last, since SeedSequence alone maps 0 and
    (0, 0), or 2**32 and (0, 1), to the same state."""
    words = np.array([int(p) & _M64 for p in parts] + [len(parts)], dtype=np.uint64)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Build a batch in the training process on one intra-op thread: the ops are small and memory-bound, and an
    OpenMP team on a busy machine costs far more than it saves (10x slower measured on a loaded 2-core box).
    DataLoader workers already run on one thread."""
    n = torch.get_num_threads()
    if n == 1 or torch.utils.data.get_worker_info() is not None:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _seed_cpu(seed: int) -> None:
    """Seed only the CPU default generator (torch.manual_seed would also reseed CUDA)."""
    torch.default_generator.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# order


class EpochOrder:
    """Which dataset indices rank `rank` trains on at each step of an epoch (drop_last).

    With `shards` (the shard of each dataset index, data.format=shards) the order is shard-local: the shards are
    shuffled, then the samples within each run of `window` consecutive shards, so that a worker reads a handful of
    shards per stretch of an epoch. wids opens a shard in ~40 ms (it walks every tar header), and a fully random
    order over ImageNet's ~1,300 shards would reopen one for nearly every sample."""

    # hand-written, not DistributedSampler: exact resume needs batch `step` without replaying the earlier ones

    def __init__(
        self,
        indices: torch.Tensor,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        shards: torch.Tensor | None = None,
        window: int = 8,
    ):
        self.indices, self.seed, self.rank, self.world_size = indices, seed, rank, world_size
        self.batch_size, self.window = batch_size, window
        self.shard_of = None if shards is None else shards[indices]
        self.steps = (len(indices) // world_size) // batch_size
        self._cache: tuple[int, torch.Tensor] | None = None

    def rank_order(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, TAG_ORDER))
            if self.shard_of is None:
                perm = torch.randperm(len(self.indices), generator=g)
            else:  # sort by (the window of the sample's shard in a shuffled shard order, a random key)
                place = torch.randperm(int(self.shard_of.max()) + 1, generator=g)[self.shard_of] // self.window
                perm = torch.argsort(place.double() + torch.rand(len(self.indices), generator=g, dtype=torch.float64))
            mine = self.indices[perm[self.rank :: self.world_size][: self.steps * self.batch_size]]
            self._cache = (epoch, mine)
        return self._cache[1]

    def batch(self, epoch: int, step: int) -> torch.Tensor:
        return self.rank_order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]


class _Steps:
    """Sampler over the steps of one epoch: yields (epoch, step) (in-memory) or lists of (epoch, step, index)
    (streamed). Mutable (epoch, start_step) so one DataLoader with persistent workers serves every epoch."""

    # hand-written: torch's samplers cannot start mid-epoch (exact resume) nor hand (epoch, step) keys to the workers

    def __init__(self, order: EpochOrder, per_sample: bool):
        self.order, self.per_sample = order, per_sample
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return max(0, self.order.steps - self.start)

    def __iter__(self):
        for step in range(self.start, self.order.steps):
            if self.per_sample:
                yield [(self.epoch, step, int(i)) for i in self.order.batch(self.epoch, step)]
            else:
                yield (self.epoch, step)


# ----------------------------------------------------------------------------------------------------------------
# in-memory path


class _MemoryTrain(Dataset):
    """Item (epoch, step) -> one batch: (uint8 images, labels, the batch stage's plan, faults=[]), or (float32
    images, targets, None, []) when the stage runs in the workers."""

    def __init__(
        self,
        split: Split,
        order: EpochOrder,
        a: AugConfig,
        image_size: int,
        stage: BatchStage,
        in_worker: bool,
        seed: int,
    ):
        self.images, self.labels, self.order, self.a = split.images, split.labels, order, a
        self.image_size, self.stage, self.in_worker, self.seed = image_size, stage, in_worker, seed
        pre = []
        if a.crop == "random_resized":  # size-changing crop: per sample (v2), before the photometric policy
            pre.append(
                v2.RandomResizedCrop(
                    image_size,
                    scale=tuple(a.crop_scale),
                    ratio=tuple(a.crop_ratio),
                    interpolation=a.interp,
                    antialias=True,
                )
            )
            if a.hflip > 0:
                pre.append(v2.RandomHorizontalFlip(a.hflip))
        pre += photometric(a, stage.mean)
        self.per_sample = v2.Compose(pre) if pre else None

    def __len__(self) -> int:  # not used by the sampler; keeps DataLoader happy
        return self.order.steps

    def __getitem__(self, key: tuple[int, int]):
        with _one_thread():
            return self._make(*key)

    def _make(self, epoch: int, step: int):
        idx = self.order.batch(epoch, step)
        x, y = self.images[idx], self.labels[idx]  # uint8 (B, 3, h, w), (B,)
        a, rank = self.a, self.order.rank
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, TAG_BATCH, rank, step))
        if a.crop != "random_resized" and (a.hflip > 0 or (a.crop == "pad_crop" and a.crop_padding > 0)):
            x = batch_crop_flip(x, a.crop_padding if a.crop == "pad_crop" else 0, a.hflip, g)
        if self.per_sample is not None:
            with torch.random.fork_rng(devices=[]):
                out = []
                for i, img in zip(idx.tolist(), x):
                    _seed_cpu(derive_seed(self.seed, epoch, TAG_SAMPLE, i))
                    out.append(self.per_sample(img))
                x = torch.stack(out)
        x = resize_batch(x, self.image_size, 1.0, a.interp).contiguous()
        return _finish(x, y, self.stage, self.in_worker, g, self.seed, epoch, rank, step)


def _plan(
    stage: BatchStage, n: int, size: tuple[int, int], g: torch.Generator, seed: int, epoch: int, rank: int, step: int
):
    if not stage.random:
        return None
    mix_seed, noise_seed = (
        derive_seed(seed, epoch, TAG_MIX, rank, step),
        derive_seed(seed, epoch, TAG_ERASE, rank, step),
    )
    return stage.plan(n, *size, g, mix_seed, noise_seed)


def _finish(x, y, stage: BatchStage, in_worker: bool, g: torch.Generator, seed: int, epoch: int, rank: int, step: int):
    """A uint8 training batch -> what the worker hands over: with the stage's plan, or through the stage here."""
    plan = _plan(stage, len(x), tuple(x.shape[2:]), g, seed, epoch, rank, step)
    if in_worker:
        x, y = stage(x, y, plan)
        plan = None
    return x, y, plan, []


# ----------------------------------------------------------------------------------------------------------------
# streamed path


class _Encoded:
    """A JPEG's bytes for the GPU decoder, with its crop box and flip (data.decode=gpu)."""

    def __init__(self, data: bytes, box: tuple[int, int, int, int], flip: bool):
        self.data, self.box, self.flip = torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip


class _FileSamples(Dataset):
    """Item (epoch, step, index) -> (uint8 training crop or _Encoded, label, epoch, step), or index -> (uint8 eval
    crop, label, 0, 0); a CorruptImage instead when the file cannot be read."""

    def __init__(self, split: Split, crop: TrainCrop | None, eval_transform, decode: str, seed: int | None):
        self.paths, self.reader, self.labels = split.paths, split.reader, split.labels
        self.crop, self.eval_transform, self.decode, self.seed = crop, eval_transform, decode, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        with _one_thread():
            return self._sample(*(key if isinstance(key, tuple) else (0, 0, key)))

    def _read(self, i: int) -> tuple[bytes, str]:
        if self.reader is not None:
            return self.reader.read(i)[0], self.reader.name(i)
        return read_bytes(self.paths[i]), self.paths[i]

    def _sample(self, epoch: int, step: int, i: int):
        try:
            data, name = self._read(i)
            if self.seed is None:
                return self.eval_transform(decode_bytes(data, name)), int(self.labels[i]), epoch, step
            with torch.random.fork_rng(devices=[]):
                _seed_cpu(derive_seed(self.seed, epoch, TAG_SAMPLE, i))
                return self._train_crop(data, name), int(self.labels[i]), epoch, step
        except CorruptImage as e:  # returned, not raised: the main process turns it into one clear line
            return e

    def _train_crop(self, data: bytes, name: str):
        crop = self.crop
        size = jpeg_size(data) if crop.rrc is not None and self.decode in ("scaled", "gpu") else None
        if size is None:
            img = crop.crop_full(decode_bytes(data, name))
        else:  # the same draws as crop_full, from the header's size, before decoding
            box, flip = crop.box(*size), crop.flip()
            if self.decode == "gpu":
                return _Encoded(data, box, flip)
            img = decode_crop_scaled(data, name, size, box, crop.size, crop.interp)
            img = img.flip(-1) if flip else img
        return crop.photometric(img) if crop.photometric is not None else img


class _Collate:
    """Stack a training batch's samples (faults set aside) and add its batch-stage plan; or, for evaluation
    (stage None), just stack."""

    def __init__(self, stage: BatchStage | None, in_worker: bool, seed: int, rank: int, image_size: int):
        self.stage, self.in_worker, self.seed, self.rank, self.image_size = stage, in_worker, seed, rank, image_size

    def __call__(self, samples: list):
        with _one_thread():
            return self._collate(samples)

    def _collate(self, samples: list):
        faults = [str(s) for s in samples if isinstance(s, CorruptImage)]
        good = [s for s in samples if not isinstance(s, CorruptImage)]
        if not good:
            return None, None, None, faults
        y = torch.tensor([s[1] for s in good], dtype=torch.long)
        if self.stage is None:
            return default_collate([s[0] for s in good]), y, None, faults
        epoch, step = good[0][2], good[0][3]
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, TAG_BATCH, self.rank, step))
        if any(isinstance(s[0], _Encoded) for s in good):  # data.decode=gpu: decoded and cropped on the device
            size = (self.image_size, self.image_size)
            return _GpuBatch(good), y, _plan(self.stage, len(good), size, g, self.seed, epoch, self.rank, step), faults
        x = default_collate([s[0] for s in good])  # in a worker it stacks straight into shared memory (one copy)
        return _finish(x, y, self.stage, self.in_worker, g, self.seed, epoch, self.rank, step)[:3] + (faults,)


class _GpuBatch:
    """A batch for the GPU decoder: JPEG bytes with their boxes and flips, and the samples that were decoded on the
    CPU anyway (non-JPEG files), already cropped (placing those costs a host-to-device index copy: rare)."""

    def __init__(self, good: list):
        self.items = [s[0] for s in good]

    def pin_memory(self) -> _GpuBatch:
        for item in self.items:
            if isinstance(item, _Encoded):
                item.data = item.data.pin_memory()
        return self

    def decode(self, size: int, interp, device: torch.device) -> torch.Tensor:
        jpegs = [k for k, item in enumerate(self.items) if isinstance(item, _Encoded)]
        decoded = decode_on_gpu(
            [self.items[k].data for k in jpegs],
            [self.items[k].box for k in jpegs],
            [self.items[k].flip for k in jpegs],
            size,
            interp,
            device,
        )
        if len(jpegs) == len(self.items):
            return decoded
        out = torch.empty((len(self.items), 3, size, size), dtype=torch.uint8, device=device)
        out[jpegs] = decoded
        rest = sorted(set(range(len(self.items))) - set(jpegs))
        out[rest] = torch.stack([self.items[k] for k in rest]).to(device, non_blocking=True)
        return out


# ----------------------------------------------------------------------------------------------------------------
# the object the trainer uses


class Data:
    """Train / val batches for one rank. See build_data."""

    def __init__(
        self,
        cfg: Any,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        train: bool = True,
        eval_on_train: bool = False,
    ):
        dcfg = {k: OmegaConf.select(cfg.data, k) for k in cfg.data}  # plain values; an unset `???` reads as None
        self.aug = aug_config(cfg.get("aug"))
        trainer = cfg.get("trainer") or {}
        self.seed = int(trainer.get("seed", 0) or 0)
        self.rank, self.world_size, self.device = int(rank), int(world_size), torch.device(device)
        self.cfg = dcfg
        self.name = str(dcfg.get("name", ""))
        self.image_size, self.batch_size = int(dcfg["image_size"]), int(dcfg["batch_size"])
        self.num_workers, why_workers = loader_workers(dcfg.get("num_workers"), self.device)
        log.info("data: %d loader workers (%s)", self.num_workers, why_workers)
        self.decode = _decode_mode(str(dcfg.get("decode") or "auto"), self.device, self.aug)
        where = str(dcfg.get("augment_on") or "auto")
        self.augment_on = ("device" if self.device.type == "cuda" else "workers") if where == "auto" else where
        self.skip_corrupt = bool(dcfg.get("skip_corrupt", False))
        self.mean, self.std = tuple(map(float, dcfg["mean"])), tuple(map(float, dcfg["std"]))
        val_split = float(dcfg.get("val_split") or 0)
        train_subset, val_subset = dcfg.get("train_subset"), dcfg.get("val_subset")
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is outside world_size {self.world_size}")

        self.has_train = bool(train)
        src: Source = load_source(
            dcfg, need_val=val_split == 0, need_train=self.has_train or val_split > 0 or eval_on_train
        )
        if self.name == "digits" and val_split == 0:
            raise UserError("data.val_split=0: the digits set has no test split; set data.val_split=0.2")
        self.description = src.description
        train, val = src.train, src.val
        self.classes = list(train.classes)
        self.num_classes = len(self.classes)
        want = dcfg.get("num_classes")
        if want is None:
            raise UserError(
                f"data.num_classes is not set; {src.description} has {self.num_classes} classes: set "
                f"data.num_classes={self.num_classes}"
            )
        if isinstance(want, bool) or not isinstance(want, int) or want != self.num_classes:
            raise UserError(
                f"data.num_classes={want} but {src.description} has {self.num_classes} classes "
                f"({', '.join(self.classes[:5])}{', ...' if self.num_classes > 5 else ''}); "
                f"set data.num_classes={self.num_classes}"
            )
        self.skipped = list(train.skipped) + (list(val.skipped) if val is not None else [])

        # --- which indices train and validate (fixed seed, independent of trainer.seed)
        n = len(train)
        if val_split > 0:
            n_val = max(1, int(round(n * val_split)))
            if n_val >= n:
                raise UserError(f"data.val_split={val_split} leaves no training images out of {n}; lower it")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
            train_idx, val_idx, val = perm[n_val:].sort().values, perm[:n_val].sort().values, train
        else:
            train_idx, val_idx = torch.arange(n), torch.arange(len(val))
        if eval_on_train:  # cvt-eval eval.split=train: the training images through the eval transform
            val, val_idx = train, train_idx
        if not self.has_train:
            train_idx = train_idx[:0]
        train_idx = _subset(train_idx, train_subset, "data.train_subset", 1)
        val_idx = _subset(val_idx, val_subset, "data.val_subset", 2)
        self.num_train, self.num_val = len(train_idx), len(val_idx)
        self._train, self._val, self._val_idx = train, val, val_idx

        # --- training order and loaders
        shards = None
        if train.shard_sizes:  # data.format=shards: the shard of every sample, for a shard-local epoch order
            shards = torch.repeat_interleave(torch.arange(len(train.shard_sizes)), torch.tensor(train.shard_sizes))
        window = int(dcfg.get("shard_window") or 8)
        self.order = EpochOrder(train_idx, self.seed, self.rank, self.world_size, self.batch_size, shards, window)
        self.steps_per_epoch = self.order.steps
        if self.steps_per_epoch == 0 and self.has_train:
            raise UserError(
                f"data.batch_size={self.batch_size}: larger than the {self.num_train // self.world_size} "
                f"training images per rank ({self.num_train} over {self.world_size} rank(s)); lower "
                "data.batch_size or raise data.train_subset"
            )
        lo, hi = self.rank * self.num_val // self.world_size, (self.rank + 1) * self.num_val // self.world_size
        self.val_local = val_idx[lo:hi]  # this rank's disjoint shard: shards cover the val set exactly once
        self.val_steps = math.ceil(len(self.val_local) / self.batch_size)
        self.in_memory = train.images is not None
        self.soft_targets = self.aug.mixing
        self.label_smoothing = self.aug.label_smoothing
        self._pin = self.device.type == "cuda"
        self._sampler = _Steps(self.order, per_sample=not self.in_memory)
        self.stage = BatchStage(self.aug, self.mean, self.std, self.num_classes)
        self.stage_seconds = 0.0  # time spent in the batch stage in this process (loader_bench reads it)
        self._train_loader = self._make_train_loader() if self.has_train else None
        self._val_loader = None if self._val.images is not None else self._make_val_loader()
        self._warned: set[str] = set()

    # --- loaders

    def _loader(self, dataset, batch_bytes: int, **kw) -> DataLoader:
        workers = self.num_workers
        if workers > 0:
            check_shared_memory(workers, batch_bytes)
        return DataLoader(
            dataset,
            num_workers=workers,
            pin_memory=self._pin,
            persistent_workers=workers > 0,
            generator=torch.Generator(),
            worker_init_fn=_worker_signals if workers else None,
            **kw,
        )

    def _make_train_loader(self) -> DataLoader:
        a, in_worker = self.aug, self.augment_on == "workers"
        per_image = 3 * self.image_size**2 * (4 if in_worker else 1)  # float32 from the stage, else uint8
        if self.in_memory:
            ds = _MemoryTrain(self._train, self.order, a, self.image_size, self.stage, in_worker, self.seed)
            return self._loader(ds, per_image * self.batch_size, sampler=self._sampler, batch_size=None)
        crop = TrainCrop(a, self.image_size, self.mean)
        ds = _FileSamples(self._train, crop, None, self.decode, self.seed)
        collate = _Collate(self.stage, in_worker, self.seed, self.rank, self.image_size)
        return self._loader(ds, per_image * self.batch_size, batch_sampler=self._sampler, collate_fn=collate)

    def _make_val_loader(self) -> DataLoader:
        ds = _FileSamples(self._val, None, eval_sample_transform(self.aug, self.image_size), "full", None)
        chunks = [
            self.val_local[k : k + self.batch_size].tolist() for k in range(0, len(self.val_local), self.batch_size)
        ]
        per_batch = 3 * self.image_size**2 * self.batch_size
        return self._loader(
            ds, per_batch, batch_sampler=chunks, collate_fn=_Collate(None, False, 0, self.rank, self.image_size)
        )

    # --- iteration

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_step.. of epoch `epoch` (0-based) for this rank; skipped batches are not decoded."""
        if self._train_loader is None:
            raise RuntimeError("this Data was built with train=False (evaluation only)")
        if not 0 <= start_step <= self.steps_per_epoch:
            raise UserError(
                f"start_step={start_step} is outside 0..{self.steps_per_epoch} steps of an epoch; the "
                "checkpoint was made with another data.batch_size, data.train_subset or world size"
            )
        self._sampler.epoch, self._sampler.start = int(epoch), int(start_step)
        yield from self._run(self._train_loader)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's disjoint shard of the val set, eval transform, no padding (last batch may be smaller)."""
        if self._val_loader is not None:
            yield from self._run(self._val_loader)
            return
        images, labels, a = self._val.images, self._val.labels, self.aug
        for k in range(0, len(self.val_local), self.batch_size):
            idx = self.val_local[k : k + self.batch_size]
            with _one_thread():
                x = resize_batch(images[idx], self.image_size, a.eval_crop_ratio, a.interp).contiguous()
                yield self.stage.normalize(self._to_device(x)), self._to_device(labels[idx])

    def _to_device(self, t):
        if self.device.type == "cpu" or t is None:
            return t
        return t.to(self.device, non_blocking=True)

    def _faults(self, faults: list[str]) -> None:
        """Raise for corrupt files, or (data.skip_corrupt=true) count and warn once per file."""
        if not faults:
            return
        if not self.skip_corrupt:
            raise UserError(
                f"{faults[0]}; delete or replace the file, or set data.skip_corrupt=true to skip such files"
            )
        for f in faults:
            if f not in self._warned:
                self._warned.add(f)
                self.skipped.append(f)
                if len(self._warned) <= 10:
                    warnings.warn(f"skipping corrupt image (data.skip_corrupt=true): {f}", stacklevel=3)

    def _run(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        finished = False
        try:
            for x, y, plan in self._on_device(loader):
                with _one_thread():
                    if isinstance(x, _GpuBatch):
                        x = x.decode(self.image_size, self.aug.interp, self.device)
                    if x.dtype == torch.uint8:  # the batch stage (or, for evaluation, the normalisation) here
                        t0 = time.perf_counter()
                        x, y = self.stage(x, y, plan)
                        self.stage_seconds += time.perf_counter() - t0  # wall time on CPU; launch time on CUDA
                yield x, y
            finished = True
        finally:
            if not finished:  # a fault, a break or preemption: stop the workers now, with their prefetched batches,
                _stop_workers(loader)  # rather than leaving them to the garbage collector (which can stall on them)

    def _on_device(self, loader: DataLoader) -> Iterator[tuple[Any, torch.Tensor, BatchPlan | None]]:
        """The loader's batches on the training device. On CUDA, batch k+1 is copied on a side stream while the
        caller computes on batch k (timm's PrefetchLoader does the same); the compute stream waits for the copy
        before it touches the batch, and the batch's memory is marked as used by the compute stream."""
        copy_stream, ahead = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None, None
        for x, y, plan, faults in loader:
            self._faults(faults)
            if x is None:
                continue
            if copy_stream is None:
                yield x, y, plan
                continue
            with torch.cuda.stream(copy_stream):
                moved = (x if isinstance(x, _GpuBatch) else self._to_device(x), self._to_device(y), plan)
            if ahead is not None:
                yield ahead
            torch.cuda.current_stream(self.device).wait_stream(copy_stream)
            for t in (moved[0], moved[1]):
                if isinstance(t, torch.Tensor):
                    t.record_stream(torch.cuda.current_stream(self.device))
            ahead = moved
        if ahead is not None:
            yield ahead

    def close(self) -> None:
        """Stop persistent DataLoader workers now (they also stop when the Data object is garbage-collected)."""
        for loader in (self._train_loader, self._val_loader):
            if loader is not None:
                _stop_workers(loader)

    def __repr__(self) -> str:
        return (
            f"Data({self.description}: {self.num_classes} classes, {self.num_train} train / {self.num_val} val "
            f"images, {self.steps_per_epoch} steps/epoch of {self.batch_size} on rank {self.rank}/"
            f"{self.world_size}, {'in memory' if self.in_memory else 'streamed'}, aug={self.aug.name})"
        )


def _decode_mode(requested: str, device: torch.device, a: AugConfig) -> str:
    """data.decode, with `auto` resolved (see decode.py), and what each mode needs."""
    if requested == "auto":
        return "scaled" if simplejpeg is not None else "full"
    if requested in ("scaled", "gpu") and simplejpeg is None:  # both read each JPEG's size from its header
        raise UserError(
            f"data.decode={requested} needs simplejpeg: pip install 'cvt-train[fast]' (or data.decode=full)"
        )
    if requested == "gpu":
        if device.type != "cuda":
            raise UserError(f"data.decode=gpu needs a CUDA device, not {device}; use data.decode=scaled or full")
        if a.crop != "random_resized" or photometric(a, (0, 0, 0)):
            raise UserError(
                f"data.decode=gpu supports aug presets whose per-sample ops are RandomResizedCrop and flip (aug={a.name} "
                f"has crop={a.crop}, auto_augment={a.auto_augment}, color_jitter={a.color_jitter}); use data.decode=scaled"
            )
    return requested


def check_shared_memory(workers: int, batch_bytes: int, prefetch: int = 2) -> None:
    """Refuse to start loader workers whose batches in flight cannot fit in /dev/shm: past it they die of a bus
    error, the usual first contact with a container (Docker gives 64 MiB unless told otherwise)."""
    if not os.path.isdir("/dev/shm"):
        return
    free, need = shutil.disk_usage("/dev/shm").free, workers * prefetch * batch_bytes
    if free < need:
        raise UserError(
            f"/dev/shm has {free / 2**20:.0f} MiB free but {workers} loader workers x {prefetch} batches in flight x "
            f"{batch_bytes / 2**20:.1f} MiB need {need / 2**20:.0f} MiB: give the container more shared memory "
            "(docker run --shm-size=16g; on Kubernetes an emptyDir with medium: Memory on /dev/shm), or lower "
            "data.num_workers or data.batch_size"
        )


def _worker_signals(_worker_id: int) -> None:  # hand-written: torch has no option to keep workers out of signals
    """In each DataLoader worker: outlive a stop signal sent to the whole process group (SLURM preemption and
    scancel signal every process of a job; Ctrl-C signals the terminal's process group).

    The main process turns the signal into a clean stop: it finishes the step, writes last.pt, then shuts its
    workers down. A worker that died of the signal first would make the main process fail ("DataLoader worker
    killed by signal") wherever it was, before it could checkpoint. So workers ignore SIGINT and SIGUSR1, and
    SIGTERM unless it comes from their parent (the main process stopping them, which torch also treats as a
    clean exit).
    """
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS / Windows (their workers are spawned, not forked)
        return
    for s in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def wait_for_parent() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=wait_for_parent, name="sigterm-from-parent", daemon=True).start()


def _stop_workers(loader: DataLoader) -> None:  # hand-written: DataLoader has no public stop for persistent workers
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def build_data(
    cfg: Any,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    train: bool = True,
    eval_on_train: bool = False,
) -> Data:
    """Everything the trainer needs from cfg.data / cfg.aug / cfg.trainer.seed (the whole composed config, checked
    by its app's validate: the values are trusted here, and only what needs the data itself is checked).

    train=False (evaluation only): the training split is not read unless val_split > 0 needs it, num_train and
    steps_per_epoch are 0, and train_batches() raises. eval_on_train: val_batches() yields the training images
    (those not held out by val_split) through the eval transform."""
    return Data(cfg, rank, world_size, device, train, eval_on_train)


# ----------------------------------------------------------------------------------------------------------------
# subsets


def _subset(idx: torch.Tensor, n: int | None, key: str, salt: int) -> torch.Tensor:
    """The first n of a fixed-seed shuffle of idx (sorted back), or idx itself."""
    if n is None or n >= len(idx):
        return idx
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(derive_seed(SPLIT_SEED, salt)))
    return idx[perm[:n]].sort().values
