"""Where the images come from: layout detection, readers, the decode cache. No augmentation here.

Supported layouts (detected from what is in `data.root`):
    torchvision python format   ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
                                ROOT/cifar-100-python/{train,test,meta}        (ROOT may also be that folder itself)
    image folders               ROOT/train/<class>/**/*.{jpg,png,...} and ROOT/val/<class>/** or ROOT/test/<class>/**
                                (torchvision ImageFolder's files, less hidden ones; sub-folders of a class count)
    embedded quickstart set     data.name=digits (UCI optical digits, 8x8, shipped in data/assets/)

A split is either decoded into memory (uint8 (N, 3, H, W); CIFAR and digits) or a list of files decoded on the fly
(ImageNet). Decoding an image folder into memory is cached as a plain-tensor file under ~/.cache/cvt_train (or
data.cache_dir, or $CVT_TRAIN_CACHE) keyed by the folder's path and its files' names, sizes and mtimes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import pickle
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from ..errors import UserError
from .decode import CorruptImage, decode_bytes, read_bytes
from .decode import short as _short

log = logging.getLogger(__name__)
# torchvision 0.29 deprecates torchvision.io's decoders in favour of TorchCodec; they work and are the fast path here
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

EXTENSIONS = (*IMG_EXTENSIONS, ".gif")  # torchvision's list lacks GIF, which decode_file reads (torchvision.io)
ASSETS = Path(__file__).resolve().parent / "assets"
CACHE_VERSION = 1

CIFAR = {  # name: (folder, train files, test files, meta file, label key, class-name key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


@dataclass
class Split:
    """One split: labels plus either decoded images (uint8 (N, 3, H, W)) or file paths to decode later."""

    classes: list[str]
    labels: torch.Tensor  # int64 (N,)
    images: torch.Tensor | None = None  # uint8 (N, 3, H, W) when in memory
    paths: list[str] | None = None  # when decoded on the fly
    reader: Any = None  # data.format=shards: reads sample i's bytes (shards.ShardReader) instead of paths
    shard_sizes: list[int] | None = None  # data.format=shards: samples per shard, in sample order
    skipped: list[str] = field(default_factory=list)  # "path: reason" of corrupt files left out (skip_corrupt)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Source:
    train: Split
    val: Split | None  # None: the layout has no val/test split (the val split must come out of train)
    description: str  # for logs: which layout was found where


# ----------------------------------------------------------------------------------------------------------------
# decoding one image file


def decode_file(path: str) -> torch.Tensor:
    """A file -> uint8 (3, H, W) RGB at full size (decode.decode_bytes)."""
    return decode_bytes(read_bytes(path), path)


# ----------------------------------------------------------------------------------------------------------------
# finding the data


def resolve_root(root: Any) -> Path:
    """data.root as an absolute path (relative to the launch dir, also under Hydra)."""
    if root is None or str(root).strip() == "":
        raise UserError("data.root is not set; set data.root=/path/to/the/dataset")
    path = Path(os.path.expanduser(str(root)))
    if not path.is_absolute():
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.utils import get_original_cwd

            base = Path(get_original_cwd()) if HydraConfig.initialized() else Path.cwd()
        except Exception:  # hydra not running (library use)
            base = Path.cwd()
        path = base / path
    return path


def load_source(dcfg: Any, need_val: bool, need_train: bool = True) -> Source:
    """Find and read the dataset of `dcfg`, the `data` config as a plain dict (as Data makes it: an unset `???`
    reads as None); `need_val` False when val_split > 0 (val/ is not read), `need_train` False for evaluation only
    (Source.train then holds the val split's classes and no images)."""
    name = str(dcfg.get("name", ""))
    if name == "digits":
        return load_digits(int(dcfg.get("image_size")))
    if name not in ("cifar10", "cifar100", "imagenet", "folder"):
        raise UserError(
            f"data.name={name!r}: unknown dataset; choose one of cifar10, cifar100, imagenet, folder, "
            "digits (data=<name>)"
        )
    root = resolve_root(dcfg.get("root"))
    download = bool(dcfg.get("download", False))
    if name in CIFAR and download and _find_cifar_pickles(root, name) is None and _find_folder(root) is None:
        _download_cifar(root, name)
    if not root.exists():
        raise UserError(
            f"data.root={root}: folder does not exist; point data.root at the dataset"
            + (" or set data.download=true" if name in CIFAR else "")
        )
    if not root.is_dir():
        raise UserError(f"data.root={root}: is a file, not a folder; point data.root at the dataset's folder")
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise UserError(
            f"data.root={root}: folder is empty; put the dataset there"
            + (" or set data.download=true" if name in CIFAR else "")
        )
    if str(dcfg.get("format") or "files") == "shards":
        return load_shards(root, need_val, need_train)
    if name in CIFAR:
        folder = _find_cifar_pickles(root, name)
        if folder is not None:
            return load_cifar_pickles(folder, name, need_val, need_train)
    layout = _find_folder(root)
    if layout is None:
        expected = f"{CIFAR[name][0]}/ or " if name in CIFAR else ""
        hint = " (it looks like a split folder itself: use its parent)" if root.name in ("train", "val", "test") else ""
        raise UserError(
            f"data.root={root}: no supported layout found (expected {expected}train/<class>/ images "
            f"with val/<class>/ or test/<class>/){hint}; point data.root at the folder that contains them"
        )
    train_dir, val_dir = layout
    in_memory = bool(dcfg.get("in_memory", False))
    skip = bool(dcfg.get("skip_corrupt", False))
    classes = scan_classes(train_dir if need_train or val_dir is None else val_dir)
    if need_val:
        if val_dir is None:
            raise UserError(
                f"data.root={root}: has train/ but no val/ or test/ folder to validate on; set "
                "data.val_split=0.1 to hold out 10% of train/ instead"
            )
        val_classes = scan_classes(val_dir)
        if val_classes != classes:
            only_t = sorted(set(classes) - set(val_classes))
            only_v = sorted(set(val_classes) - set(classes))
            raise UserError(
                f"data.root={root}: class folders differ between train/ and {val_dir.name}/ (only in "
                f"train/: {_few(only_t)}; only in {val_dir.name}/: {_few(only_v)}); make them the same"
            )
    reader = load_folder_in_memory if in_memory else list_folder
    train = reader(train_dir, classes, skip, dcfg) if need_train else _no_images(classes)
    val = reader(val_dir, classes, skip, dcfg) if need_val else None
    return Source(train, val, f"image folders under {root}")


def load_shards(root: Path, need_val: bool, need_train: bool) -> Source:
    """data.format=shards: ROOT/train/index.json (+ ROOT/val/ or ROOT/test/), as scripts/make_shards.py writes."""
    from .shards import is_shard_split, load_shard_split

    train_dir = root / "train"
    if not is_shard_split(train_dir):
        raise UserError(
            f"data.format=shards: {train_dir / 'index.json'} not found; write shards with "
            f"`python scripts/make_shards.py IMAGE_FOLDER {root}`, or set data.format=files for image folders"
        )
    val_dir = next((root / n for n in ("val", "test") if is_shard_split(root / n)), None)

    def split(folder: Path) -> Split:
        index = load_shard_split(folder)
        sizes = [n for _, n in index.reader.shards]
        return Split(list(index.classes), index.labels, reader=index.reader, shard_sizes=sizes)

    train = split(train_dir)
    if need_val and val_dir is None:
        raise UserError(
            f"data.root={root}: shards for train/ but none for val/ or test/; set data.val_split=0.1 to hold out 10% "
            "of train/ instead"
        )
    val = split(val_dir) if need_val else None
    if val is not None and val.classes != train.classes:
        raise UserError(f"data.root={root}: the class lists of train/ and {val_dir.name}/ shards differ; remake them")
    if not need_train:
        train = Split(train.classes, train.labels[:0], reader=train.reader, shard_sizes=[])
    return Source(train, val, f"shards under {root}")


def _no_images(classes: list[str]) -> Split:
    return Split(classes, torch.zeros(0, dtype=torch.long), images=torch.zeros(0, 3, 1, 1, dtype=torch.uint8))


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "") if names else "none"


def _find_cifar_pickles(root: Path, name: str) -> Path | None:
    folder, train_files, test_files = CIFAR[name][:3]
    for cand in (root / folder, root):
        if (cand / train_files[0]).is_file() or (cand / test_files[0]).is_file():
            return cand
    return None


def _find_folder(root: Path) -> tuple[Path, Path | None] | None:
    """(train dir, val-or-test dir or None) for ROOT/train, or a single nested ROOT/<dir>/train."""
    cands = (
        [root]
        if (root / "train").is_dir()
        else [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "train").is_dir()]
        if root.is_dir()
        else []
    )
    if len(cands) != 1:
        return None
    base = cands[0]
    val = next((base / v for v in ("val", "test") if (base / v).is_dir()), None)
    return base / "train", val


def scan_classes(split_dir: Path) -> list[str]:
    try:  # hidden folders dropped: torchvision would make .ipynb_checkpoints/ (Jupyter) a class
        classes = [c for c in find_classes(split_dir)[0] if not c.startswith(".")]
    except FileNotFoundError:  # no sub-folder at all: the one-line UserError below says what layout is expected
        classes = []
    if not classes:
        raise UserError(f"{split_dir}: no class folders; expected {split_dir.name}/<class>/<image files>")
    return classes


def _scan_files(split_dir: Path, classes: list[str], stamps: bool) -> tuple[list[str], list[int], list[tuple]]:
    """Sorted image files per class (torchvision's make_dataset), their labels, and (rel path, size, mtime) for the
    cache key if `stamps`."""
    top = str(split_dir)

    def visible_image(path: str) -> bool:  # hidden ones dropped: macOS ._x.jpg forks and .ipynb_checkpoints/ copies
        return has_file_allowed_extension(path, EXTENSIONS) and f"{os.sep}." not in path[len(top) :]

    samples = make_dataset(top, {c: i for i, c in enumerate(classes)}, is_valid_file=visible_image, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    for cls in (c for c, n in zip(classes, counts) if n == 0):  # ours, not torchvision's: names the folder, one line
        cdir = split_dir / cls
        if not cdir.is_dir():  # torchvision skips a missing class folder silently
            raise UserError(f"{cdir}: class folder missing; every split needs the same class folders")
        raise UserError(f"{cdir}: class folder has no images ({', '.join(EXTENSIONS)}); add images or remove it")
    paths, labels = [p for p, _ in samples], [label for _, label in samples]
    return paths, labels, [(p[len(top) + 1 :], *_size_mtime(p)) for p in paths] if stamps else []


def _size_mtime(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:  # a dangling link: decoding reports it as an unreadable file
        return -1, -1
    return st.st_size, st.st_mtime_ns


def list_folder(split_dir: Path, classes: list[str], skip: bool, dcfg: Any) -> Split:
    paths, labels, _ = _scan_files(split_dir, classes, stamps=False)
    return Split(classes, torch.tensor(labels, dtype=torch.long), paths=paths)


# ----------------------------------------------------------------------------------------------------------------
# image folder -> memory, with a cache


def cache_dir(dcfg: Any) -> Path:
    d = dcfg.get("cache_dir") or os.environ.get("CVT_TRAIN_CACHE")
    if d:
        return Path(os.path.expanduser(str(d)))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cvt_train"


def load_folder_in_memory(split_dir: Path, classes: list[str], skip: bool, dcfg: Any) -> Split:
    """Decode every image of a split once into uint8 (N, 3, H, W); the second run loads the cached tensor."""
    paths, labels, stamp = _scan_files(split_dir, classes, stamps=True)
    key = hashlib.sha256(repr((CACHE_VERSION, str(split_dir.resolve()), classes, stamp)).encode()).hexdigest()[:24]
    cdir = cache_dir(dcfg)
    cfile = cdir / f"{split_dir.parent.name}-{split_dir.name}-{key}.pt"
    with _locked(cdir, cfile):  # several ranks on one node: one decodes, the others wait and load
        cached = _read_cache(cfile)
        if cached is None:
            t0 = time.perf_counter()
            images, keep, bad = decode_all(paths, min(os.cpu_count() or 1, 8))  # one-off: use the cores
            cached = {
                "images": images,
                "labels": torch.tensor(labels, dtype=torch.long)[keep],
                "classes": classes,
                "bad": bad,
                "version": CACHE_VERSION,
            }
            log.info("decoded %d images of %s in %.1f s", len(images), split_dir, time.perf_counter() - t0)
            if not bad or skip:  # a cache never hides a corrupt file from a run with skip_corrupt=false
                _write_cache(cfile, cached)
        else:
            log.info("loaded %d decoded images of %s from %s", len(cached["images"]), split_dir, cfile)
    bad = list(cached["bad"])
    if bad and not skip:
        raise UserError(
            f"{bad[0]}; delete or replace the file, or set data.skip_corrupt=true to skip "
            f"{'it' if len(bad) == 1 else f'all {len(bad)} such files'}"
        )
    if bad:
        warnings.warn(
            f"{split_dir}: skipped {len(bad)} corrupt image(s) (data.skip_corrupt=true), first: {bad[0]}", stacklevel=2
        )
    return Split(classes, cached["labels"], images=cached["images"], skipped=bad)


@contextlib.contextmanager
def _locked(cdir: Path, cfile: Path) -> Iterator[None]:
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        import fcntl

        f = open(cfile.with_suffix(".lock"), "w")
    except (OSError, ImportError):  # read-only home, no fcntl: work without a lock
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()  # releases the lock


def _read_cache(cfile: Path) -> dict | None:
    if not cfile.is_file():
        return None
    try:
        obj = torch.load(cfile, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and obj.get("version") == CACHE_VERSION and obj["images"].dtype == torch.uint8:
            return obj
    except Exception as e:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable decode cache %s (%s)", cfile, _short(e))
    return None


def _write_cache(cfile: Path, obj: dict) -> None:
    tmp = cfile.with_suffix(f".tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, cfile)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("could not write the decode cache %s (%s); the next run decodes again", cfile, _short(e))


class _DecodeChunks(torch.utils.data.Dataset):
    """Chunks of files for parallel decoding in DataLoader workers: a chunk -> (uint8 (n, 3, H, W) or None, kept
    indices, corrupt-file messages, first file of another size or None). One stacked tensor per chunk: one
    shared-memory handle instead of hundreds."""

    def __init__(self, paths: list[str], chunk: int):
        self.paths, self.chunk = paths, chunk

    def __len__(self) -> int:
        return (len(self.paths) + self.chunk - 1) // self.chunk

    def __getitem__(self, i: int):
        start = i * self.chunk
        imgs, keep, bad = [], [], []
        for j, p in enumerate(self.paths[start : start + self.chunk]):
            try:
                img = decode_file(p)
            except CorruptImage as e:
                bad.append(str(e))
                continue
            if imgs and img.shape != imgs[0].shape:
                return None, keep, bad, (p, tuple(img.shape[1:]), tuple(imgs[0].shape[1:]))
            imgs.append(img)
            keep.append(start + j)
        return (torch.stack(imgs) if imgs else None), keep, bad, None


def decode_all(paths: list[str], num_workers: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode all files (in `num_workers` processes) into one uint8 (N, 3, H, W); all must have one size."""
    workers = num_workers
    if len(paths) < 4096 or workers < 2:
        workers = 0  # not worth starting processes
    ds = _DecodeChunks(paths, chunk=1024)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, generator=torch.Generator())
    imgs, keep, bad = [], [], []
    for chunk_imgs, chunk_keep, chunk_bad, odd in loader:
        if chunk_imgs is not None and imgs and chunk_imgs.shape[1:] != imgs[0].shape[1:]:
            odd = (paths[chunk_keep[0]], tuple(chunk_imgs.shape[2:]), tuple(imgs[0].shape[2:]))
        if odd is not None:
            raise UserError(
                f"{odd[0]}: its size {odd[1]} differs from {odd[2]} of the others; data.in_memory=true "
                "needs images of one size: set data.in_memory=false or resize the images"
            )
        if chunk_imgs is not None:
            imgs.append(chunk_imgs)
        keep += chunk_keep
        bad += chunk_bad
    if not imgs:
        raise UserError(
            f"{Path(paths[0]).parent.parent}: none of the {len(paths)} images could be decoded, first: {bad[0]}"
        )
    return torch.cat(imgs), torch.tensor(keep, dtype=torch.long), bad


# ----------------------------------------------------------------------------------------------------------------
# torchvision's CIFAR python format


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what a dict of numpy arrays, lists and strings needs (nothing that can
    run code), so a hostile file in data.root is refused like a hostile checkpoint."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"it would load {module}.{name}, which could run code")


class _Refused(pickle.UnpicklingError):
    pass


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(
            f"{path}: file missing from the CIFAR folder; re-download it (delete the folder and set data.download=true)"
        )
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise UserError(f"{path}: refused: {e}; replace it with the original torchvision download") from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: truncated or corrupt CIFAR batch ({_short(e)}); re-download it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR batch (expected a dict with 'data' and labels); re-download it")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}  # bytes keys too


def load_cifar_pickles(folder: Path, name: str, need_val: bool, need_train: bool = True) -> Source:
    _, train_files, test_files, meta_file, label_key, names_key = CIFAR[name]
    meta = _read_pickle(folder / meta_file) if (folder / meta_file).is_file() else {}
    n_classes = 10 if name == "cifar10" else 100
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])] or [
        str(i) for i in range(n_classes)
    ]

    def read(files: list[str]) -> Split:
        imgs, labels = [], []
        for fname in files:
            path = folder / fname
            batch = _read_pickle(path)
            data, lab = batch.get("data"), batch.get(label_key)
            if (
                not isinstance(data, np.ndarray)
                or lab is None
                or data.ndim != 2
                or data.shape[1] != 3072
                or len(lab) != len(data)
            ):
                raise UserError(
                    f"{path}: not a {name} batch ('data' must be N x 3072 uint8 with N '{label_key}'); re-download it"
                )
            imgs.append(torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).view(-1, 3, 32, 32))
            labels.append(torch.as_tensor(np.asarray(lab, dtype=np.int64)))
        labels_t = torch.cat(labels)
        if len(labels_t) and (labels_t.min() < 0 or labels_t.max() >= len(classes)):
            raise UserError(f"{folder}: labels outside 0..{len(classes) - 1}; the files do not belong to {name}")
        return Split(classes, labels_t, images=torch.cat(imgs))

    train = read(train_files) if need_train else _no_images(classes)
    val = read(test_files) if need_val else None
    return Source(train, val, f"{name} python batches in {folder}")


def _download_cifar(root: Path, name: str) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # offline, proxy, disk full, bad checksum
        raise UserError(
            f"data.download=true: could not download {name} into {root} ({_short(e)}); download it "
            "by hand or point data.root at a copy"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# the embedded quickstart set


def load_digits(image_size: int) -> Source:
    """UCI optical digits (scikit-learn's copy, CC BY 4.0): 1797 8x8 images of 0..16 -> uint8 RGB at image_size."""
    path = ASSETS / "digits.csv.gz"
    try:
        with gzip.open(path, "rt") as f:
            arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path}: the embedded digits set is missing or damaged ({_short(e)}); reinstall cvt-train"
        ) from None
    pixels = torch.from_numpy(np.rint(arr[:, :64] * (255.0 / 16.0))).view(-1, 1, 8, 8)
    if image_size != 8:  # upscale once (bilinear: smooth strokes suit a conv embedding better than blocky pixels)
        pixels = torch.nn.functional.interpolate(
            pixels, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    images = pixels.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(arr[:, 64].astype(np.int64))
    return Source(Split([str(i) for i in range(10)], labels, images=images), None, f"embedded digits ({path.name})")
