"""Image-folder splits as tar shards (webdataset format), written once and read by sample index through wids.

On-disk layout of one split (written by `write_shard_split`, i.e. scripts/make_shards.py):

    OUT/<split>/<split>-000000.tar, <split>-000001.tar, ...
        per sample two members, <key>.<ext> (the source image file's bytes, unchanged; ext lower-cased: jpg, jpeg,
        png, ...) and <key>.cls (the class index as ASCII digits); key = 8-digit global sample index + "_" + the
        file's path under the split with everything but [A-Za-z0-9_-] replaced by "_", e.g.
        00012345_n01440764_n01440764_10026
    OUT/<split>/index.json
        wids' shard index ({"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": ...,
        "shardlist": [{"url": "<split>-000000.tar", "nsamples": 1000, "filesize": ...}, ...]}, urls relative to
        the folder) plus our own "classes" (class names in index order) and "labels" (every sample's class index
        in global sample order), so the trainer knows the labels without opening a tar. Written last: a split
        whose writing was interrupted has no index.json.

Global sample order is torchvision make_dataset's sorted order of the source folder; shard s holds samples
[s * shard_size, (s + 1) * shard_size).

Reading (`ShardReader`) goes through `wids.ShardListDataset`, which maps a global index to (shard, index in shard),
keeps an LRU of open shards (each one an mmap of the tar plus an index of its members built by walking all its
headers when it is opened) and hands back each member as a BytesIO; we ask it for no decoding. Things about wids
0.1.11 this module works around:
  - By default it "downloads" every shard, local ones included, into /tmp/_wids_cache (a full copy). Its
    `localname` hook decides where a shard lives locally; ours returns a symlink to the shard in a node-local
    folder, so nothing is copied and the lock file wids takes around each open lands there, not next to the shards
    (those may be on a read-only or network file system).
  - Its constructor prints a line to stderr every time (`if True or WIDS_VERBOSE`); one per DataLoader worker.
  - It refuses more than 100 open shards per process (wids_dl.max_open_objects), all datasets together, and the
    LRU closes a shard as soon as it falls out: with a uniformly random order over many shards nearly every read
    re-opens and re-indexes a shard. A shard-local order (wids' ShardListSampler / ChunkedSampler) avoids that.
  - Its tar parser reads the ustar name field only (no prefix, no PAX headers), which is why member names here are
    short ASCII with no "/", and a key may hold no "." (the extension starts at the first dot of a name).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import UserError

INDEX_NAME = "index.json"
KIND = "wids-shard-index-v1"  # what wids' own widsindex tool writes into __kind__
LABEL_EXT = "cls"
DEFAULT_LRU_SIZE = 32  # open shards per process; wids raises past 100 open files per process, all readers together
_TAR_MTIME = 0  # a fixed member mtime: the same images give byte-identical shards


def shard_name(split: str, s: int) -> str:
    return f"{split}-{s:06d}.tar"


def sample_key(i: int, rel_path: str) -> str:
    """Unique (the index) and readable (the source path); no "." (wids splits the extension at the first dot) and
    short enough for a plain ustar name field (100 bytes), which is all wids' tar parser reads."""
    stem = os.path.splitext(rel_path)[0]
    return f"{i:08d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', stem)}"[:80]


def is_shard_split(split_dir: Path) -> bool:
    return (Path(split_dir) / INDEX_NAME).is_file()


# ----------------------------------------------------------------------------------------------------------------
# writing


@dataclass
class WriteSummary:
    split_dir: Path
    samples: int
    shards: int
    nbytes: int


def write_shard_split(
    samples: Sequence[tuple[str, int]], classes: list[str], src_dir: Path, out_dir: Path, shard_size: int
) -> WriteSummary:
    """Write `samples` ((path under src_dir, class index), in global order) as shards plus index.json in out_dir.

    Each shard is written under a temporary name and renamed when complete; index.json comes last. Shards of a
    previous run under the same names are replaced, and ones beyond the new count removed, so that the folder holds
    exactly what index.json lists."""
    webdataset = _require("webdataset")

    if shard_size < 1:
        raise UserError(f"--shard-size={shard_size}: must be at least 1")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    split = out_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / INDEX_NAME  # an index.json that no longer matches the shards being rewritten
    stale.unlink(missing_ok=True)
    shardlist, nbytes = [], 0
    for s, start in enumerate(range(0, len(samples), shard_size)):
        name = shard_name(split, s)
        tmp = out_dir / f".{name}.partial"
        with open(tmp, "wb") as f, webdataset.TarWriter(f, encoder=False, mtime=_TAR_MTIME) as tw:
            for i, (path, label) in enumerate(samples[start : start + shard_size], start):
                rel = os.path.relpath(path, src_dir)
                ext = os.path.splitext(path)[1][1:].lower()
                tw.write({"__key__": sample_key(i, rel), ext: _read_bytes(path), LABEL_EXT: str(label).encode()})
        os.replace(tmp, out_dir / name)
        size = (out_dir / name).stat().st_size
        shardlist.append({"url": name, "nsamples": len(samples[start : start + shard_size]), "filesize": size})
        nbytes += size
    keep = {d["url"] for d in shardlist}
    for old in out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in keep:
            old.unlink()
    index = {"__kind__": KIND, "wids_version": 1, "name": split, "shardlist": shardlist, "classes": classes}
    _write_index(out_dir / INDEX_NAME, index, [label for _, label in samples])
    return WriteSummary(out_dir, len(samples), len(shardlist), nbytes)


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); fix or remove the file and run again") from None


def _write_index(path: Path, index: dict, labels: list[int]) -> None:
    # indented for people, except the labels (one per sample): those go on one line instead of a million
    head = json.dumps(index, indent=1)
    text = head[: -len("\n}")] + ',\n "labels": ' + json.dumps(labels, separators=(",", ":")) + "\n}\n"
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# reading


@dataclass
class ShardIndex:
    """One shard split: its class names, every sample's label, and a reader of the samples' image bytes."""

    classes: list[str]
    labels: torch.Tensor  # int64 (N,)
    reader: ShardReader
    split_dir: Path

    def __len__(self) -> int:
        return len(self.labels)


def load_shard_split(split_dir: Path, lru_size: int = DEFAULT_LRU_SIZE) -> ShardIndex:
    """Read and check split_dir/index.json (fields, labels, that every listed shard exists); opens no tar.
    `lru_size`: shards the reader keeps open per process."""
    split_dir = Path(split_dir).resolve()
    path = split_dir / INDEX_NAME
    redo = "re-run scripts/make_shards.py for this split"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; make the shards with scripts/make_shards.py SRC OUT") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: unreadable or not JSON ({e}); {redo}") from None
    if not isinstance(index, dict):
        raise UserError(f"{path}: expected a JSON object with shardlist, classes and labels; {redo}")
    missing = [k for k in ("wids_version", "shardlist", "classes", "labels") if k not in index]
    if missing:
        raise UserError(f"{path}: missing field(s) {', '.join(missing)}; {redo}")
    if index["wids_version"] != 1:
        raise UserError(f"{path}: wids_version {index['wids_version']!r}, only 1 is supported; {redo}")
    if "datasets" in index:
        raise UserError(f"{path}: nested 'datasets' are not supported, only one shardlist; {redo}")
    shardlist, classes, labels = index["shardlist"], index["classes"], index["labels"]
    if not (isinstance(shardlist, list) and shardlist and all(_shard_ok(d) for d in shardlist)):
        raise UserError(f"{path}: shardlist must be a non-empty list of {{url: str, nsamples: int >= 0}}; {redo}")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{path}: classes must be a non-empty list of names; {redo}")
    if not (isinstance(labels, list) and all(type(x) is int for x in labels)):
        raise UserError(f"{path}: labels must be a list of class indices; {redo}")

    shards = []
    for d in shardlist:
        url = urlparse(d["url"])
        if url.scheme not in ("", "file"):
            raise UserError(f"{path}: shard {d['url']!r} is not a local file (only local shards are read); {redo}")
        shards.append((str(split_dir / url.path), int(d["nsamples"])))  # an absolute url.path stays as it is
    absent = [p for p, _ in shards if not os.path.isfile(p)]
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise UserError(f"{absent[0]}: shard listed in {path} is missing{more}; restore it or {redo}")
    total = sum(n for _, n in shards)
    if total != len(labels):
        raise UserError(f"{path}: {len(labels)} labels but the shards hold {total} samples; {redo}")
    labels_t = torch.tensor(labels, dtype=torch.long)
    if len(labels_t) and not (0 <= int(labels_t.min()) and int(labels_t.max()) < len(classes)):
        bad = labels[int(((labels_t < 0) | (labels_t >= len(classes))).nonzero()[0])]
        raise UserError(f"{path}: label {bad} outside 0..{len(classes) - 1} ({len(classes)} classes); {redo}")
    return ShardIndex(classes, labels_t, ShardReader(shards, lru_size), split_dir)


def _shard_ok(d: object) -> bool:
    return (
        isinstance(d, dict) and isinstance(d.get("url"), str) and type(d.get("nsamples")) is int and d["nsamples"] >= 0
    )


class ShardReader:
    """Random access to the samples' raw image bytes by global index, through wids.ShardListDataset.

    Picklable and fork-safe: only the shard list travels; the wids dataset (open files, mmaps) is made lazily in
    the process that reads, and made again when the pid changes (a forked DataLoader worker must not share the
    parent's open files and LRU). Not thread-safe (neither is wids' LRU): one reader per thread.
    """

    def __init__(self, shards: list[tuple[str, int]], lru_size: int = DEFAULT_LRU_SIZE):
        # absolute: the paths become symlink targets elsewhere, and a worker may run in another directory
        self.shards = [(os.path.abspath(p), int(n)) for p, n in shards]  # in global sample order
        self.lru_size = lru_size
        self._ends = []  # cumulative sample counts: shard s holds [ends[s-1], ends[s])
        for _, n in self.shards:
            self._ends.append((self._ends[-1] if self._ends else 0) + n)
        self._ds = None
        self._pid = None

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ds": None, "_pid": None}

    def _dataset(self):
        if self._pid != os.getpid():
            self._ds = None  # a forked copy of the parent's: dropping it closes only this process's copies
            wids = _require("wids")
            with contextlib.redirect_stderr(io.StringIO()):  # its unconditional "nfiles: ... cache: ..." line
                self._ds = wids.ShardListDataset(
                    [{"url": p, "nsamples": n} for p, n in self.shards],
                    localname=_ShardLink(_link_dir()),
                    transformations=[],  # raw BytesIO members, no decoding
                    lru_size=self.lru_size,
                )
            self._pid = os.getpid()
        return self._ds

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard number, index inside it); also the range check (wids would wrap a negative index around)."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range 0..{len(self) - 1}")
        s = bisect.bisect_right(self._ends, i)
        return s, i - (self._ends[s - 1] if s else 0)

    def _sample(self, i: int) -> dict:
        s, inner = self._locate(i)
        path, nsamples = self.shards[s]
        try:
            # get_shard, not ds[i]: __getitem__ would also print a "cache miss rate" warning that a random order
            # always triggers, and we want the opened shard itself to compare its size with index.json
            shard, _, _ = self._dataset().get_shard(i)
            if len(shard) != nsamples:
                raise UserError(
                    f"{path}: holds {len(shard)} samples, index.json says {nsamples}; re-run scripts/make_shards.py"
                )
            return shard[inner]
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated/corrupt tar fails in mmap, struct or wids' asserts
            raise UserError(
                f"{path}: cannot read shard ({type(e).__name__}: {e}); re-run scripts/make_shards.py"
            ) from None

    def read(self, i: int) -> tuple[bytes, str]:
        """(the image file's bytes, its extension such as "jpg") of sample i."""
        sample = self._sample(i)
        exts = [k for k in sample if k.startswith(".") and k != "." + LABEL_EXT]
        if len(exts) != 1:
            raise UserError(
                f"{self.name(i)}: expected one image member besides .{LABEL_EXT}, found {exts or 'none'}; "
                "re-run scripts/make_shards.py"
            )
        return sample[exts[0]].getvalue(), exts[0][1:]

    def name(self, i: int) -> str:
        """`<shard file>:<sample key>` for messages; `<shard file>:#<index in shard>` if the shard is unreadable."""
        s, inner = self._locate(i)
        base = os.path.basename(self.shards[s][0])
        try:
            return f"{base}:{self._sample(i)['__key__']}"
        except UserError:
            return f"{base}:#{inner}"

    def close(self) -> None:
        if self._ds is not None and self._pid == os.getpid():
            self._ds.close()
        self._ds = self._pid = None


def _require(module: str):
    """webdataset and wids are needed only for shards, so imported only here; a missing one is one line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"tar shards need the {module} package; pip install webdataset wids") from None


def _link_dir() -> Path:
    """Node-local folder for the shard symlinks and wids' lock files; per user, since /tmp is shared."""
    base = os.environ.get("CVT_TRAIN_WIDS_DIR") or os.path.join(tempfile.gettempdir(), f"cvt_train_wids_{os.getuid()}")
    return Path(base)


class _ShardLink:
    """wids' `localname` hook: where the shard "lives locally" -> a symlink to the shard itself.

    wids opens that path if it exists and copies the shard there otherwise; the symlink means it always exists, so
    nothing is copied. The link name hashes the shard's full path, so splits and datasets never collide."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, url: str) -> str:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        link = self.folder / f"{digest}-{os.path.basename(url)}"
        if not (link.is_symlink() and os.readlink(link) == url):
            # made under a temporary name and renamed: atomic, so concurrent workers never see a half-made link
            tmp = link.with_name(f".{link.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            os.symlink(url, tmp)
            os.replace(tmp, link)
        return str(link)
