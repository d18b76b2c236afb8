"""Write an ImageNet-like folder of JPEGs for data-loader benchmarks (scripts/loader_bench.py), made from the
CIFAR-10 training JPEGs, without needing ImageNet itself.

    python scripts/make_imagenet_like.py /tmp/inet --count 3000
    python scripts/make_imagenet_like.py /tmp/inet --count 600 --classes 10 --force

Each image is a mosaic of CIFAR photographs tiled at their native 32x32 size (16x12 tiles for 500x375), cropped
to one of ImageNet's typical sizes (mostly 500x375 and 375x500, some 500x333, 500x500 and 640x480), and saved
with PIL as a quality-90 JPEG with 4:2:0 chroma, like most ImageNet files. Natural-image content at native
resolution gives the encoder and decoder real high-frequency detail; upscaled 32x32 images would be smooth,
compress far better and decode unrealistically fast. Tiles of output class c come from CIFAR class c mod 10.
Everything is deterministic from --seed.

Layout, as data=imagenet expects: OUT/train/<wnid>/<i>.JPEG and OUT/val/<wnid>/<i>.JPEG (a --val-fraction of
--count more images, at least one per class), with made-up wnids n00000000, n00000001, ... The mean file size
and pixel count are printed to set against real ImageNet's.
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

TILE = 32
# (width, height): weights give mostly the two 4:3 shapes, as in ImageNet's train set
SIZES = [((500, 375), 0.50), ((375, 500), 0.20), ((500, 333), 0.12), ((500, 500), 0.10), ((640, 480), 0.08)]
DEFAULT_CIFAR = "/work/shared/data/cifar10-jpeg-train.tgz"


def read_cifar(path: Path, per_class: int) -> list[np.ndarray]:
    """Tiles per CIFAR class, each (n, 32, 32, 3) uint8, at most per_class of them (the first in archive order)."""
    by_class: dict[str, list[np.ndarray]] = {}
    with tarfile.open(path, "r:*") as tar:  # read straight from the archive: no unpacked copy needed
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 2 or not m.name.lower().endswith((".jpg", ".jpeg")):
                continue
            tiles = by_class.setdefault(parts[-2], [])
            if len(tiles) >= per_class:
                continue
            f = tar.extractfile(m)
            if f is None:
                continue
            with Image.open(io.BytesIO(f.read())) as im:
                im = im.convert("RGB")
                if im.size != (TILE, TILE):
                    continue
                tiles.append(np.asarray(im))
    if not by_class:
        raise SystemExit(f"{path}: no JPEG files found under <class>/ folders")
    return [np.stack(by_class[c]) for c in sorted(by_class)]


def mosaic(tiles: np.ndarray, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Enough random tiles to cover size (w, h), cropped at a random offset to exactly that size."""
    w, h = size
    cols, rows = -(-w // TILE), -(-h // TILE)
    pick = [rng.randrange(len(tiles)) for _ in range(rows * cols)]
    grid = tiles[pick].reshape(rows, cols, TILE, TILE, 3).transpose(0, 2, 1, 3, 4).reshape(rows * TILE, cols * TILE, 3)
    x0, y0 = rng.randrange(cols * TILE - w + 1), rng.randrange(rows * TILE - h + 1)
    return Image.fromarray(np.ascontiguousarray(grid[y0 : y0 + h, x0 : x0 + w]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (train/ and val/ are written in it)")
    ap.add_argument("--count", type=int, default=2000, help="training images (default 2000)")
    ap.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="val images as a fraction of --count (0.05)")
    ap.add_argument("--cifar", type=Path, default=Path(DEFAULT_CIFAR), help=f"CIFAR-10 JPEG tgz ({DEFAULT_CIFAR})")
    ap.add_argument("--per-class", type=int, default=1000, help="CIFAR tiles kept per class (default 1000)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="delete an existing OUT/train and OUT/val first")
    a = ap.parse_args()
    if a.count < 1 or a.classes < 1 or not 0 <= a.val_fraction < 1:
        ap.error("--count and --classes must be >= 1, --val-fraction in [0, 1)")
    for sub in ("train", "val"):
        d = a.out / sub
        if d.exists() and any(d.iterdir()):
            if not a.force:
                ap.error(f"{d} is not empty (stale files would skew a benchmark); pass --force to replace it")
            shutil.rmtree(d)

    t0 = time.perf_counter()
    pools = read_cifar(a.cifar, a.per_class)
    print(f"read {sum(len(p) for p in pools)} CIFAR tiles of {len(pools)} classes in {time.perf_counter() - t0:.1f} s")

    rng = random.Random(a.seed)
    shapes, weights = zip(*SIZES)
    wnids = [f"n{c:08d}" for c in range(a.classes)]
    n_val = max(a.classes, round(a.count * a.val_fraction)) if a.val_fraction > 0 else 0
    t0 = time.perf_counter()
    nbytes = pixels = widths = heights = 0
    for split, n in (("train", a.count), ("val", n_val)):
        for c in wnids:
            (a.out / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = i % a.classes  # round-robin: balanced classes
            size = rng.choices(shapes, weights)[0]
            im = mosaic(pools[c % len(pools)], size, rng)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=a.quality, subsampling="4:2:0")
            (a.out / split / wnids[c] / f"{i:06d}.JPEG").write_bytes(buf.getvalue())
            nbytes += buf.tell()
            pixels += size[0] * size[1]
            widths, heights = widths + size[0], heights + size[1]
            if (i + 1) % 500 == 0:
                print(f"  {split}: {i + 1}/{n}", file=sys.stderr)
    total = a.count + n_val
    print(
        f"wrote {a.count} train + {n_val} val images of {a.classes} classes to {a.out} in "
        f"{time.perf_counter() - t0:.1f} s\n"
        f"mean file size {nbytes / total / 1e3:.1f} KB, mean pixel count {pixels / total / 1e3:.1f} k (mean size "
        f"{widths / total:.0f}x{heights / total:.0f}), total {nbytes / 1e6:.1f} MB\n"
        "(for comparison: real ImageNet train JPEGs average about 110 KB and about 470x390 pixels)"
    )


if __name__ == "__main__":
    main()
