#!/usr/bin/env python
"""Image folders -> tar shards (webdataset format) with a wids index, for reading by sample index at scale.

    python scripts/make_shards.py SRC OUT [--shard-size 1000] [--splits train val test]

Reads SRC/<split>/<class>/**/<image> for each split present (torchvision's find_classes / make_dataset with its
IMG_EXTENSIONS, hidden files and folders skipped, as ImageFolder orders them) and writes OUT/<split>/<split>-000000.tar
... plus OUT/<split>/index.json; the layout is described in cvt_train/data/shards.py. Image bytes are copied as they
are (no re-encoding). Every split must have the same class folders as the first one, so that labels mean the same
thing in all of them. One summary line per split; bad input gives one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from cvt_train.data.shards import write_shard_split
from cvt_train.errors import UserError


def scan_classes(split_dir: Path) -> list[str]:
    try:  # hidden folders dropped: torchvision would make .ipynb_checkpoints/ a class
        classes = [c for c in find_classes(split_dir)[0] if not c.startswith(".")]
    except FileNotFoundError:  # torchvision's "Couldn't find any class folder"; ours names the layout below
        classes = []
    if not classes:
        raise UserError(f"{split_dir}: no class folders; expected {split_dir.name}/<class>/<image files>")
    return classes


def scan_split(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, class index) of every visible image, in make_dataset's sorted order."""
    top = str(split_dir)

    def visible_image(path: str) -> bool:  # hidden ones dropped: macOS ._x.jpg forks, .ipynb_checkpoints/ copies
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and f"{os.sep}." not in path[len(top) :]

    samples = make_dataset(top, {c: i for i, c in enumerate(classes)}, is_valid_file=visible_image, allow_empty=True)
    found = {label for _, label in samples}
    for label, cls in enumerate(classes):
        if label not in found:  # torchvision would carry on with a class that has no images
            raise UserError(
                f"{split_dir / cls}: class folder has no images ({', '.join(IMG_EXTENSIONS)}); add images or remove it"
            )
    return samples


def make_shards(src: Path, out: Path, shard_size: int, splits: list[str]) -> None:
    if not src.is_dir():
        raise UserError(f"{src}: {'not a folder' if src.exists() else 'no such folder'}; give the image-folder root")
    present = [s for s in splits if (src / s).is_dir()]
    if not present:
        raise UserError(f"{src}: none of {', '.join(splits)}/ found; expected {src}/<split>/<class>/<image files>")
    if shard_size < 1:
        raise UserError(f"--shard-size={shard_size}: must be at least 1")
    classes = None
    for split in present:
        split_classes = scan_classes(src / split)
        if classes is not None and split_classes != classes:
            only_first = sorted(set(classes) - set(split_classes))[:5]
            only_here = sorted(set(split_classes) - set(classes))[:5]
            raise UserError(
                f"{src / split}: class folders differ from {present[0]}/ (only in {present[0]}/: {only_first}; "
                f"only in {split}/: {only_here}); make them the same"
            )
        classes = split_classes
        samples = scan_split(src / split, classes)
        done = write_shard_split(samples, classes, src / split, out / split, shard_size)
        print(
            f"{split}: {done.samples} samples, {len(classes)} classes -> {done.shards} shards "
            f"({done.nbytes / 1e6:.1f} MB) in {done.split_dir}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="image-folder root: SRC/<split>/<class>/<images>")
    p.add_argument("out", type=Path, help="output root: OUT/<split>/*.tar and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="split folders to convert if present")
    args = p.parse_args(argv)
    try:
        make_shards(args.src, args.out, args.shard_size, args.splits)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing OUT: full disk, no permission
        print(f"error: {e.filename or args.out}: {e.strerror or e}; check the output folder", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
