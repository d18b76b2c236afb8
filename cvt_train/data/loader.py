"""Batches for the trainer: `build_data(cfg, rank, world_size, device)` -> `Data`.

Reproducibility contract: the training batches of epoch e (which samples, in which order, and every random
augmentation choice including MixUp/CutMix) are a pure function of (trainer.seed, e, rank, world_size):
    order          a permutation from a generator seeded with (seed, epoch); rank r takes every world_size-th entry
    per-sample ops seeded with (seed, epoch, sample index) inside torch.random.fork_rng (RandAugment, erasing, ...)
    batch ops      seeded with (seed, epoch, rank, step) (batched crop/flip via a torch.Generator; mixing under
                   fork_rng)
So the batches do not depend on num_workers, on which worker made them, or on where an epoch was (re)started, and
the data pipeline never draws from or changes the global RNG the model's dropout uses (the DataLoader gets its own
generator, since it would otherwise draw a base seed from the global RNG on every iter()).

Two paths:
    in memory (CIFAR, digits, data.in_memory=true): the dataset is a uint8 tensor; one DataLoader item is one whole
        batch (gather by index, batched crop+flip, per-sample v2 policies, resize if needed, normalise, erasing,
        mixing), made in workers when num_workers > 0 (fork shares the tensor copy-on-write).
    streamed (ImageNet, folders): one item is one file, decoded and transformed in DataLoader workers; the collate
        function stacks and mixes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..errors import UserError
from .sources import CorruptImage, Source, Split, decode_file, load_source
from .transforms import (
    AugConfig,
    Mixer,
    aug_config,
    batch_crop_flip,
    eval_sample_transform,
    normalize_batch,
    photometric,
    resize_batch,
    train_sample_transform,
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
    """Which dataset indices rank `rank` trains on at each step of an epoch (drop_last)."""

    # hand-written, not DistributedSampler: exact resume needs batch `step` without replaying the earlier ones

    def __init__(self, indices: torch.Tensor, seed: int, rank: int, world_size: int, batch_size: int):
        self.indices, self.seed, self.rank, self.world_size = indices, seed, rank, world_size
        self.batch_size = batch_size
        self.steps = (len(indices) // world_size) // batch_size
        self._cache: tuple[int, torch.Tensor] | None = None

    def rank_order(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, TAG_ORDER))
            perm = torch.randperm(len(self.indices), generator=g)
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
    """Item (epoch, step) -> one augmented batch (images float32 normalised, targets, faults=[])."""

    def __init__(
        self, split: Split, order: EpochOrder, a: AugConfig, image_size: int, mean, std, num_classes: int, seed: int
    ):
        self.images, self.labels, self.order, self.a = split.images, split.labels, order, a
        self.image_size, self.seed = image_size, seed
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
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
        pre += photometric(a, mean)
        self.per_sample = v2.Compose(pre) if pre else None
        self.erase = v2.RandomErasing(a.random_erasing, value="random") if a.random_erasing > 0 else None
        self.mixer = Mixer(a, num_classes) if a.mixing else None

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
        with torch.random.fork_rng(devices=[]):
            if self.per_sample is not None:
                out = []
                for i, img in zip(idx.tolist(), x):
                    _seed_cpu(derive_seed(self.seed, epoch, TAG_SAMPLE, i))
                    out.append(self.per_sample(img))
                x = torch.stack(out)
            x = normalize_batch(resize_batch(x, self.image_size, 1.0, a.interp), self.mean, self.std)
            if self.erase is not None:
                for j, i in enumerate(idx.tolist()):
                    _seed_cpu(derive_seed(self.seed, epoch, TAG_ERASE, i))
                    x[j] = self.erase(x[j])
            if self.mixer is not None:
                _seed_cpu(derive_seed(self.seed, epoch, TAG_MIX, rank, step))
                x, y = self.mixer(x, y)
        return x.contiguous(), y, []


# ----------------------------------------------------------------------------------------------------------------
# streamed path


class _FileSamples(Dataset):
    """Item (epoch, step, index) or index -> (image float32 normalised, label, epoch, step) or a CorruptImage."""

    def __init__(self, split: Split, transform: v2.Compose, seed: int | None):
        self.paths, self.labels, self.transform, self.seed = split.paths, split.labels, transform, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        with _one_thread():
            return self._sample(*(key if isinstance(key, tuple) else (0, 0, key)))

    def _sample(self, epoch: int, step: int, i: int):
        try:
            img = decode_file(self.paths[i])
        except CorruptImage as e:  # returned, not raised: the main process turns it into one clear line
            return e
        if self.seed is None:
            return self.transform(img), int(self.labels[i]), epoch, step
        with torch.random.fork_rng(devices=[]):
            _seed_cpu(derive_seed(self.seed, epoch, TAG_SAMPLE, i))
            return self.transform(img), int(self.labels[i]), epoch, step


class _Collate:
    """Stack samples, set faults aside, mix the batch with a (seed, epoch, rank, step) seed."""

    def __init__(self, mixer: Mixer | None, seed: int, rank: int):
        self.mixer, self.seed, self.rank = mixer, seed, rank

    def __call__(self, samples: list):
        with _one_thread():
            return self._collate(samples)

    def _collate(self, samples: list):
        faults = [str(s) for s in samples if isinstance(s, CorruptImage)]
        good = [s for s in samples if not isinstance(s, CorruptImage)]
        if not good:
            return None, None, faults
        x = torch.stack([s[0] for s in good])
        y = torch.tensor([s[1] for s in good], dtype=torch.long)
        if self.mixer is not None:
            epoch, step = good[0][2], good[0][3]
            with torch.random.fork_rng(devices=[]):
                _seed_cpu(derive_seed(self.seed, epoch, TAG_MIX, self.rank, step))
                x, y = self.mixer(x, y)
        return x, y, faults


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
        self.num_workers = int(dcfg.get("num_workers") or 0)
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
        self.order = EpochOrder(train_idx, self.seed, self.rank, self.world_size, self.batch_size)
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
        self._train_loader = self._make_train_loader() if self.has_train else None
        self._val_loader = None if self._val.images is not None else self._make_val_loader()
        self._warned: set[str] = set()

    # --- loaders

    def _loader(self, dataset, **kw) -> DataLoader:
        workers = self.num_workers
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
        a = self.aug
        if self.in_memory:
            ds = _MemoryTrain(
                self._train, self.order, a, self.image_size, self.mean, self.std, self.num_classes, self.seed
            )
            return self._loader(ds, sampler=self._sampler, batch_size=None)
        ds = _FileSamples(self._train, train_sample_transform(a, self.image_size, self.mean, self.std), self.seed)
        collate = _Collate(Mixer(a, self.num_classes) if a.mixing else None, self.seed, self.rank)
        return self._loader(ds, batch_sampler=self._sampler, collate_fn=collate)

    def _make_val_loader(self) -> DataLoader:
        ds = _FileSamples(self._val, eval_sample_transform(self.aug, self.image_size, self.mean, self.std), None)
        chunks = [
            self.val_local[k : k + self.batch_size].tolist() for k in range(0, len(self.val_local), self.batch_size)
        ]
        return self._loader(ds, batch_sampler=chunks, collate_fn=_Collate(None, 0, self.rank))

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
        mean = torch.tensor(self.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std).view(1, 3, 1, 1) * 255
        for k in range(0, len(self.val_local), self.batch_size):
            idx = self.val_local[k : k + self.batch_size]
            with _one_thread():
                x = normalize_batch(resize_batch(images[idx], self.image_size, a.eval_crop_ratio, a.interp), mean, std)
            yield self._to_device(x), self._to_device(labels[idx])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        return t.to(self.device, non_blocking=True)

    def _faults(self, faults: list[str]) -> None:
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
            for x, y, faults in loader:
                self._faults(faults)
                if x is not None:
                    yield self._to_device(x), self._to_device(y)
            finished = True
        finally:
            if not finished:  # a fault, a break or preemption: stop the workers now, with their prefetched batches,
                _stop_workers(loader)  # rather than leaving them to the garbage collector (which can stall on them)

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
