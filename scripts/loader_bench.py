"""Images/s of a training data pipeline alone (decode, augmentation, batching; no model), to set against the
model's images/s from cvt-bench or a training run's log (whose `data_wait` says how long the model waited), and
against reference pipelines (timm's, and decode-only floors) on the same files.

    python scripts/loader_bench.py data=cifar10 data.root=/data/cifar10-jpeg data.val_split=0.1
    python scripts/loader_bench.py data=imagenet data.root=/data/imagenet aug=imagenet data.num_workers=8 --batches 50

--pipeline ours (the default) takes the same overrides as cvt-train (the model is not built) and times
build_data(cfg).train_batches. The other pipelines read an ImageNet-layout folder (--root, with ROOT/train/<class>/)
and run with one DataLoader worker by default, so that images/s is one worker core's rate (the main process only
receives batches, plus the work printed as "main process", which stands for the GPU's share of a GPU run):

    timm                 timm.data.create_transform(224, is_training=True, RandAugment, random erasing 0.25 pixel,
                         bicubic) on PIL images in the worker, float32 batches; timm Mixup/CutMix in the main
                         process (as timm's train.py without --prefetcher, where it runs on the GPU)
    timm-prefetch        timm.data.create_loader(use_prefetcher=True, device=cpu): uint8 batches from the worker;
                         normalisation + random erasing (timm's PrefetchLoader) and Mixup in the main process
                         (--prefetch-mixup collate: timm's FastCollateMixup in the worker instead, as timm's train.py
                         does with --prefetcher)
    decode-torchvision   read the file, torchvision.io.decode_jpeg at full size, nothing else (the decode floor)
    decode-simplejpeg    read the file, simplejpeg.decode_jpeg at full size, nothing else

Prints the set-up time, images/s (median over the timed batches, and mean), the bytes per image that cross
shared memory from the workers to the main process (the nbytes of the batch tensors the main process receives,
over the batch size) and, for the pipelines whose batches go to a GPU, the host->device bytes per image; a
final Markdown table row collects them. The commands for the comparison table (an ImageNet-like folder made from
tiled CIFAR-10 photographs; see scripts/make_imagenet_like.py):

    python scripts/make_imagenet_like.py /tmp/inet --count 3000
    python scripts/loader_bench.py --pipeline decode-torchvision --root /tmp/inet
    python scripts/loader_bench.py --pipeline decode-simplejpeg --root /tmp/inet
    python scripts/loader_bench.py --pipeline timm --root /tmp/inet
    python scripts/loader_bench.py --pipeline timm-prefetch --root /tmp/inet
    python scripts/loader_bench.py --pipeline timm-prefetch --root /tmp/inet --prefetch-mixup collate
    python scripts/loader_bench.py data=imagenet data.root=/tmp/inet data.num_classes=10 aug=imagenet \\
        data.num_workers=1 data.batch_size=256

Short runs while developing: --batches 5 --warmup 2 --batch-size 64 (ours: data.batch_size=64).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import dataloader as _dataloader

PIPELINES = ("ours", "timm", "timm-prefetch", "decode-torchvision", "decode-simplejpeg")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as data=imagenet and timm use


@dataclass
class Batch:
    images: int
    main_s: float | None = None  # main-process work on this batch (None: not measured)
    h2d_bytes: int | None = None  # what a GPU run would copy host->device (None: no GPU in this pipeline)


# ----------------------------------------------------------------------------------------------------------------
# measurement


def nbytes(obj) -> int:
    """Bytes of the tensors / arrays in a (nested) batch."""
    if isinstance(obj, torch.Tensor | np.ndarray):
        return obj.nbytes
    if isinstance(obj, list | tuple):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(nbytes(o) for o in obj.values())
    return 0


class ShmMeter:
    """Bytes of every batch that a DataLoader's main process receives from its workers, for any pipeline (ours
    included, without reaching into it): wraps the multiprocessing iterator's hook that each received batch
    passes through (a private torch method; without it the meter reports nothing)."""

    def __init__(self) -> None:
        self.bytes = self.batches = 0
        self.ok = hasattr(_dataloader._MultiProcessingDataLoaderIter, "_process_data")

    def reset(self) -> None:
        self.bytes = self.batches = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if not self.ok:
            yield
            return
        cls = _dataloader._MultiProcessingDataLoaderIter
        orig = cls._process_data

        def process(it, data, *args, **kw):
            self.bytes += nbytes(data)
            self.batches += 1
            return orig(it, data, *args, **kw)

        cls._process_data = process
        try:
            yield
        finally:
            cls._process_data = orig


class Waited:
    """Wraps a DataLoader: counts the time the main process waits for (and receives) its batches, so that the rest
    of the time between batches is the main process's own work."""

    def __init__(self, loader: DataLoader):
        self.loader, self.wait_s, self.last_bytes = loader, 0.0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - t
            self.last_bytes = nbytes(b)
            yield b


def one_thread_worker(worker_id: int, inner=None) -> None:
    # One intra-op thread per worker, so that images/s is per worker core (torch's worker loop already sets this;
    # explicit in case that changes). PIL, simplejpeg and torchvision's decode_jpeg are single-threaded.
    torch.set_num_threads(1)
    if inner is not None:
        inner(worker_id)


def measure(batches: Iterator[Batch], warmup: int, n: int, meter: ShmMeter) -> tuple[list[float], list[Batch]]:
    """Seconds between consecutive batches (including the main process's work on each) and the batches, after
    `warmup` untimed ones (workers starting, first files read)."""
    times, kept = [], []
    last = time.perf_counter()
    for i, b in enumerate(batches):
        now = time.perf_counter()
        if i == warmup - 1:  # the batches received from here on are the timed ones
            meter.reset()
        if i >= warmup:
            times.append(now - last)
            kept.append(b)
        last = now
        if len(times) == n:
            break
    return times, kept


# ----------------------------------------------------------------------------------------------------------------
# comparison pipelines


def pil_rgb(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        im = Image.open(f)
        return im.convert("RGB")


def decode_torchvision(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


def decode_simplejpeg(path: str) -> torch.Tensor:
    import simplejpeg

    with open(path, "rb") as f:
        # a tensor, not the numpy array: tensors cross to the main process through shared memory, arrays would be
        # pickled through a pipe, which would make the two decoders' floors incomparable
        return torch.from_numpy(simplejpeg.decode_jpeg(f.read(), "RGB"))


def list_collate(samples: list) -> tuple[list[torch.Tensor], torch.Tensor]:
    # images of different sizes: a list, no stacking (and no copy) in the worker
    return [s[0] for s in samples], torch.tensor([s[1] for s in samples])


def image_folder(root: Path, loader):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root / "train"), loader=loader)


def loop(loader) -> Iterator:
    while True:  # epochs, until the measurement stops asking
        yield from loader


def plain_loader(a, ds, collate_fn=None) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=a.batch_size,
        shuffle=True,
        drop_last=True,  # full batches only: Mixup needs an even batch, and bytes/image stay exact
        num_workers=a.workers,
        persistent_workers=a.workers > 0,
        collate_fn=collate_fn,
        worker_init_fn=one_thread_worker if a.workers else None,
        generator=torch.Generator().manual_seed(a.seed),
    )


def mixup_for(a, num_classes: int, fast_collate: bool = False):
    from timm.data import FastCollateMixup, Mixup

    # the official CvT recipe's mixing, as aug=imagenet
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)
    return FastCollateMixup(**kw) if fast_collate else Mixup(**kw)


def timm_batches(a) -> tuple[Iterator[Batch], str]:
    from timm.data import create_transform

    ds = image_folder(a.root, pil_rgb)
    ds.transform = create_transform(
        224,
        is_training=True,
        auto_augment=a.auto_augment,
        re_prob=0.25,
        re_mode="pixel",
        interpolation="bicubic",
        mean=MEAN,
        std=STD,
    )
    mixup = mixup_for(a, len(ds.classes))
    waited = Waited(plain_loader(a, ds))

    def gen():
        for x, y in loop(waited):
            t = time.perf_counter()
            h2d = nbytes((x, y))  # timm's train.py copies the float batch and labels, then mixes on the GPU
            x, y = mixup(x, y)
            yield Batch(len(x), time.perf_counter() - t, h2d)

    return gen(), f"{len(ds)} images of {len(ds.classes)} classes in {a.root / 'train'}, mixup in the main process"


def timm_prefetch_batches(a) -> tuple[Iterator[Batch], str]:
    from timm.data import create_loader

    ds = image_folder(a.root, pil_rgb)
    collate = mixup_for(a, len(ds.classes), fast_collate=True) if a.prefetch_mixup == "collate" else None
    pf = create_loader(
        ds,
        input_size=(3, 224, 224),
        batch_size=a.batch_size,
        is_training=True,
        no_aug=False,
        re_prob=0.25,
        re_mode="pixel",
        auto_augment=a.auto_augment,
        interpolation="bicubic",
        mean=MEAN,
        std=STD,
        num_workers=a.workers,
        collate_fn=collate,
        device=torch.device("cpu"),  # PrefetchLoader then skips its CUDA stream and works on CPU tensors
        use_prefetcher=True,
        persistent_workers=True,
    )
    dl = pf.loader
    if a.workers:
        dl.worker_init_fn = partial(one_thread_worker, inner=dl.worker_init_fn)  # keeps timm's worker seeding
    waited = Waited(dl)
    pf.loader = waited  # the PrefetchLoader iterates this; its wait is then told apart from its own work
    mixup = mixup_for(a, len(ds.classes)) if collate is None else None

    def gen():
        it = loop(pf)
        while True:
            t, w = time.perf_counter(), waited.wait_s
            x, y = next(it)
            if mixup is not None:
                x, y = mixup(x, y)
            # what the prefetcher copies to the GPU: the uint8 batch and labels (soft ones with collate mixup)
            yield Batch(len(x), time.perf_counter() - t - (waited.wait_s - w), waited.last_bytes)

    where = "FastCollateMixup in the worker" if collate is not None else "Mixup in the main process"
    return gen(), f"{len(ds)} images of {len(ds.classes)} classes in {a.root / 'train'}, {where}"


def decode_batches(a, fn) -> tuple[Iterator[Batch], str]:
    ds = image_folder(a.root, fn)

    def gen():
        for x, _ in loop(plain_loader(a, ds, list_collate)):
            yield Batch(len(x))

    return gen(), f"{len(ds)} images in {a.root / 'train'}, decoded at full size"


# ----------------------------------------------------------------------------------------------------------------
# ours


class SampledStage:
    """Runs the batch stage on every k-th batch only (and passes the others through as they came): with
    data.augment_on=device the stage belongs to the GPU, so here it is timed on a sample of batches without making
    the main process the bottleneck of the workers' rate."""

    def __init__(self, stage, every: int):
        self.stage, self.every, self.calls, self.ran = stage, every, 0, 0

    def __call__(self, x, y, plan):
        self.calls += 1
        if (self.calls - 1) % self.every:
            return x, y
        self.ran += 1
        return self.stage(x, y, plan)

    def __getattr__(self, name):
        return getattr(self.stage, name)


def ours_batches(a, data) -> Iterator[Batch]:
    """Our batches, with the batch stage's time in this process (data.stage_seconds: RandAugment, normalisation,
    erasing, mixing when data.augment_on=device; nothing when it runs in the workers) as the main-process work, per
    batch it ran on, and as host->device bytes what the workers hand over (uint8 images and int64 labels when the
    stage runs after the copy; the finished float batch when it runs in the workers)."""
    on_device = getattr(data, "augment_on", "workers") == "device"
    sampled = None
    if on_device and a.stage_every > 1:
        sampled = data.stage = SampledStage(data.stage, a.stage_every)
    epoch = 0
    while True:
        before, ran = getattr(data, "stage_seconds", 0.0), 0  # (no stage before issue 12: the "before" row)
        for x, y in data.train_batches(epoch):
            now, ran_now = getattr(data, "stage_seconds", 0.0), sampled.ran if sampled else 0
            main_s = None if sampled and ran_now == ran else now - before
            before, ran = now, ran_now
            h2d = x[0].numel() * x.shape[0] + 8 * x.shape[0] if on_device else nbytes((x, y))
            yield Batch(x.shape[0], main_s, h2d)
        epoch += 1


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "overrides", nargs="*", help="--pipeline ours: cvt-train overrides (data=..., data.root=..., aug=...)"
    )
    ap.add_argument("--pipeline", choices=PIPELINES, default="ours", help="what to time (default ours)")
    ap.add_argument(
        "--stage-every",
        type=int,
        default=4,
        help="ours with data.augment_on=device: run (and time) the batch stage on every k-th batch only (default 4)",
    )
    ap.add_argument("--batches", type=int, default=100, help="timed batches (default 100)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches first (workers starting; default 5)")
    ap.add_argument("--root", type=Path, help="other pipelines: the folder with train/<class>/ images")
    ap.add_argument("--batch-size", type=int, help="other pipelines: batch size (default 256)")
    ap.add_argument("--workers", type=int, help="other pipelines: DataLoader workers (default 1: per worker core)")
    ap.add_argument(
        "--main-threads", type=int, default=1, help="torch threads of the main process (default 1: one core)"
    )
    ap.add_argument(
        "--auto-augment",
        default="rand-m9-mstd0.5-inc1-mmax9",
        help="timm pipelines: timm's RandAugment spec (default rand-m9-mstd0.5-inc1-mmax9)",
    )
    ap.add_argument(
        "--prefetch-mixup",
        choices=("main", "collate"),
        default="main",
        help="timm-prefetch: Mixup in the main process (default) or timm's FastCollateMixup in the worker",
    )
    ap.add_argument("--seed", type=int, default=0, help="other pipelines: shuffling and augmentation seed")
    a = ap.parse_args()
    if a.batches < 1 or a.warmup < 0:
        ap.error("--batches must be >= 1 and --warmup >= 0")
    torch.set_num_threads(a.main_threads)
    meter = ShmMeter()

    t0 = time.perf_counter()
    data = None
    if a.pipeline == "ours":
        if a.root or a.batch_size or a.workers is not None:
            ap.error("--pipeline ours: give data.root=, data.batch_size=, data.num_workers= as overrides")
        from hydra import compose, initialize_config_module

        from cvt_train.data import build_data

        with initialize_config_module("cvt_train.conf", version_base="1.3"):
            cfg = compose("train", overrides=a.overrides)
        data = build_data(cfg)
        batches, what = ours_batches(a, data), repr(data)
        batch_size, workers = data.batch_size, data.num_workers
        label = f"ours (aug={data.aug.name})"
    else:
        if a.overrides:
            ap.error(f"--pipeline {a.pipeline} takes no cvt-train overrides: {' '.join(a.overrides)}")
        if a.root is None or not (a.root / "train").is_dir():
            ap.error(f"--pipeline {a.pipeline} needs --root with a train/<class>/ folder")
        a.batch_size = a.batch_size or 256
        a.workers = 1 if a.workers is None else a.workers
        if a.batch_size % 2:
            ap.error("--batch-size must be even (Mixup mixes each batch with its reverse)")
        torch.manual_seed(a.seed)
        make = {
            "timm": timm_batches,
            "timm-prefetch": timm_prefetch_batches,
            "decode-torchvision": partial(decode_batches, fn=decode_torchvision),
            "decode-simplejpeg": partial(decode_batches, fn=decode_simplejpeg),
        }[a.pipeline]
        batches, what = make(a)
        batch_size, workers, label = a.batch_size, a.workers, a.pipeline
    setup = time.perf_counter() - t0
    print(f"{what}\nset-up {setup:.1f} s")

    with meter.installed():
        times, kept = measure(batches, a.warmup, a.batches, meter)
    if len(times) < a.batches:
        sys.exit("the pipeline stopped early")
    images = sum(b.images for b in kept)
    median_ips = statistics.median(b.images / t for b, t in zip(kept, times, strict=True))
    mean_ips = images / sum(times)
    shm = meter.bytes / meter.batches / batch_size if meter.batches else None
    h2d = [b.h2d_bytes / b.images for b in kept if b.h2d_bytes is not None]
    main_ms = [1e3 * b.main_s for b in kept if b.main_s is not None]

    def fmt_bytes(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    print(f"{label}: {len(times)} batches of {batch_size}, {workers} worker(s), {a.main_threads} main thread(s)")
    print(f"  {median_ips:,.0f} images/s (median), {mean_ips:,.0f} images/s (mean)")
    shm_note = "" if meter.ok else " (not measurable: torch's DataLoader internals changed)"
    print(f"  worker->main (shared memory): {fmt_bytes(shm)} bytes/image{shm_note}")
    if h2d:
        print(f"  host->device: {fmt_bytes(statistics.mean(h2d))} bytes/image")
    if main_ms:
        print(
            f"  main process (the device-side work, on CPU here): {statistics.median(main_ms):.1f} ms/batch "
            f"(median), {statistics.mean(main_ms):.1f} ms/batch (mean)"
        )
    main_col = f"{statistics.median(main_ms):.1f}" if main_ms else "-"
    print(
        "| pipeline | workers | batch | images/s (median) | images/s (mean) | shm B/image | H2D B/image | main ms/batch |"
    )
    print(
        f"| {label} | {workers} | {batch_size} | {median_ips:,.0f} | {mean_ips:,.0f} | {fmt_bytes(shm)} | "
        f"{fmt_bytes(statistics.mean(h2d) if h2d else None)} | "
        f"{main_col} |"
    )
    if data is not None:
        data.close()


if __name__ == "__main__":
    main()
