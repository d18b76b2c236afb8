"""Tar shards: scripts/make_shards.py writes them, cvt_train.data.shards reads them back by index through wids.

Tiny generated image folders (JPEG and PNG made with PIL, 3 classes, a nested sub-folder, hidden files that must be
skipped), shard size 7 so that every split spans several shards. The tars are also checked with Python's tarfile,
independently of wids.
"""

from __future__ import annotations

import importlib.util
import io
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from cvt_train.data.shards import INDEX_NAME, ShardReader, is_shard_split, load_shard_split
from cvt_train.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_shards.py"
CLASSES = ["ant", "bee", "cow"]
SHARD_SIZE = 7
COUNTS = {"train": 24, "val": 9}


def write_images(src: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in COUNTS.items():
        for i in range(n):
            folder = src / split / CLASSES[i % 3] / ("sub" if i % 5 == 4 else "")  # make_dataset walks sub-folders
            folder.mkdir(parents=True, exist_ok=True)
            size = int(rng.integers(5, 17))
            img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            fmt, ext = [("JPEG", ".jpg"), ("PNG", ".png"), ("JPEG", ".JPEG")][i % 3]
            img.save(folder / f"img.{i}{ext}", format=fmt)  # a dot in the stem: keys must still be dot-free
    (src / "train" / "ant" / "._img.0.jpg").write_bytes(b"macOS resource fork, not an image")
    (src / "train" / "bee" / "notes.txt").write_text("not an image")


def visible(path: str) -> bool:
    return not any(part.startswith(".") for part in Path(path).parts[-3:]) and path.lower().endswith(
        (".jpg", ".jpeg", ".png")
    )


def expected(src: Path, split: str) -> tuple[ImageFolder, list[bytes], list[str]]:
    """torchvision's ImageFolder over the split (hidden files left out): the order and labels the shards must keep."""
    ds = ImageFolder(str(src / split), is_valid_file=visible)
    data = [Path(p).read_bytes() for p, _ in ds.samples]
    exts = [os.path.splitext(p)[1][1:].lower() for p, _ in ds.samples]
    return ds, data, exts


def load_script():
    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def link_dir(tmp_path_factory):
    """The reader's symlinks to the shards (see shards.py) in a temporary folder, not in /tmp for good."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CVT_TRAIN_WIDS_DIR", str(tmp_path_factory.mktemp("links")))
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("shards")
    src, out = base / "src", base / "out"
    write_images(src)
    r = subprocess.run(
        [sys.executable, str(SCRIPT), str(src), str(out), "--shard-size", str(SHARD_SIZE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["train", "val"], r.stdout  # one summary line per split
    assert f"{COUNTS['train']} samples" in lines[0]
    return src, out


def test_tars_hold_source_bytes_and_index_matches_imagefolder(shards):
    src, out = shards
    for split, n in COUNTS.items():
        folder, data, exts = expected(src, split)
        assert len(data) == n  # the hidden file and the .txt are not samples
        index = json.loads((out / split / INDEX_NAME).read_text())
        assert index["wids_version"] == 1
        assert index["classes"] == folder.classes == CLASSES
        assert index["labels"] == folder.targets
        shardlist = index["shardlist"]
        assert [d["nsamples"] for d in shardlist] == [min(SHARD_SIZE, n - s) for s in range(0, n, SHARD_SIZE)]
        assert sorted(p.name for p in (out / split).glob("*.tar")) == [d["url"] for d in shardlist]

        # read back with tarfile (not wids): members <key>.cls then <key>.<ext>, in global sample order
        got, keys = [], set()
        for d in shardlist:
            with tarfile.open(out / split / d["url"]) as tar:
                members = tar.getmembers()
                assert len(members) == 2 * d["nsamples"]
                for cls, img in zip(members[::2], members[1::2]):
                    key, ext = img.name.split(".", 1)
                    assert cls.name == f"{key}.cls" and "." not in key and key not in keys
                    keys.add(key)
                    got.append((tar.extractfile(img).read(), ext, int(tar.extractfile(cls).read())))
        assert got == list(zip(data, exts, folder.targets))


def test_reader_random_access_after_pickle_and_in_forked_child(shards):
    src, out = shards
    _, data, exts = expected(src, "train")
    index = load_shard_split(out / "train")
    assert len(index) == len(index.reader) == len(data)
    assert index.labels.dtype.is_floating_point is False and index.classes == CLASSES
    reader = index.reader
    order = list(range(len(data)))
    random.Random(0).shuffle(order)  # jumps between shards, back and forth
    for i in order:
        assert reader.read(i) == (data[i], exts[i]), i
    assert reader.name(3).startswith("train-000000.tar:00000003_")
    assert reader.name(SHARD_SIZE).startswith("train-000001.tar:")

    copy = pickle.loads(pickle.dumps(reader))  # what a spawned DataLoader worker gets: no open files travel
    assert copy._ds is None
    for i in reversed(order):
        assert copy.read(i) == (data[i], exts[i]), i

    # a forked child inherits the reader with the parent's wids dataset already open; it must open its own
    parent_ds = reader._dataset()
    recv, send = mp.Pipe(duplex=False)
    child = mp.get_context("fork").Process(target=_read_all_in_child, args=(reader, order, send))
    child.start()
    send.close()
    got = recv.recv()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got["reopened"]
    assert got["samples"] == {i: (data[i], exts[i]) for i in order}
    assert reader._dataset() is parent_ds  # the parent's dataset still open and working after the child's exit
    assert reader.read(order[0]) == (data[order[0]], exts[order[0]])


def _read_all_in_child(reader: ShardReader, order: list[int], conn) -> None:
    inherited = reader._ds
    samples = {i: reader.read(i) for i in order}
    conn.send({"reopened": reader._ds is not inherited and reader._pid == os.getpid(), "samples": samples})
    conn.close()


class ImageBytes(Dataset):
    def __init__(self, reader: ShardReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> tuple[int, bytes, str]:
        return (i, *self.reader.read(i))


def _as_list(batch: list) -> list:
    return batch


def test_dataloader_with_two_workers(shards):
    src, out = shards
    _, data, exts = expected(src, "train")
    reader = load_shard_split(out / "train").reader
    reader.read(0)  # opened in the parent before the workers fork
    loader = DataLoader(ImageBytes(reader), batch_size=5, num_workers=2, collate_fn=_as_list)
    got = [sample for batch in loader for sample in batch]
    assert got == [(i, data[i], exts[i]) for i in range(len(data))]


def test_wids_itself_reads_the_index(shards, tmp_path):
    """index.json is wids' own format: wids.ShardListDataset opens it as is (copying shards into its cache)."""
    import wids

    src, out = shards
    _, data, exts = expected(src, "val")
    ds = wids.ShardListDataset(str(out / "val" / INDEX_NAME), cache_dir=str(tmp_path / "cache"), transformations=[])
    assert len(ds) == len(data)
    for i in (8, 0, 5):
        assert ds[i]["." + exts[i]].getvalue() == data[i]


def _remove_shard(d: Path) -> str:
    (d / "train-000001.tar").unlink()
    return str(d / "train-000001.tar")


def _truncate_index(d: Path) -> str:
    (d / INDEX_NAME).write_text((d / INDEX_NAME).read_text()[:50])
    return str(d / INDEX_NAME)


def _edit_index(change):
    def edit(d: Path) -> str:
        index = json.loads((d / INDEX_NAME).read_text())
        change(index)
        (d / INDEX_NAME).write_text(json.dumps(index))
        return str(d / INDEX_NAME)

    return edit


@pytest.mark.parametrize(
    "break_it, words",
    [
        (_remove_shard, "missing"),
        (_truncate_index, "not JSON"),
        (_edit_index(lambda x: x.pop("labels")), "missing field(s) labels"),
        (_edit_index(lambda x: x.pop("classes")), "missing field(s) classes"),
        (_edit_index(lambda x: x["labels"].pop()), "labels but the shards hold"),
        (_edit_index(lambda x: x["labels"].__setitem__(3, 3)), "label 3 outside 0..2"),
        (_edit_index(lambda x: x["shardlist"][0].pop("nsamples")), "shardlist must be"),
    ],
    ids=["missing-shard", "corrupt-json", "no-labels", "no-classes", "label-count", "label-range", "no-nsamples"],
)
def test_bad_split_is_one_user_error_naming_the_path(shards, tmp_path, break_it, words):
    d = tmp_path / "train"
    shutil.copytree(shards[1] / "train", d)
    path = break_it(d)
    with pytest.raises(UserError) as e:
        load_shard_split(d)
    msg = str(e.value)
    assert path in msg and words in msg and "\n" not in msg


def test_damaged_shard_fails_at_read_with_its_path(shards, tmp_path):
    d = tmp_path / "train"
    shutil.copytree(shards[1] / "train", d)
    reader = load_shard_split(d).reader
    shard = d / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1536])  # the first samples only: fewer than index.json says
    with pytest.raises(UserError, match="train-000002.tar: holds 1 samples, index.json says 7"):
        reader.read(2 * SHARD_SIZE)
    assert reader.name(2 * SHARD_SIZE) == "train-000002.tar:#0"
    assert reader.read(0)[1] in ("jpg", "png", "jpeg")  # the other shards are still fine
    with pytest.raises(IndexError):
        reader.read(len(reader))
    assert not is_shard_split(tmp_path)


def test_make_shards_bad_input_is_one_line(tmp_path):
    script = load_script()  # main() in this process (the fixture ran it as a subprocess): no interpreter start-up
    missing, empty = tmp_path / "nope", tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    err, outp = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "stderr", err)
        m.setattr(sys, "stdout", outp)
        assert script.main([str(missing), str(tmp_path / "out")]) == 2
        assert script.main([str(tmp_path), str(tmp_path / "out")]) == 2  # no train/ val/ test/ under it
        assert script.main([str(empty), str(tmp_path / "out")]) == 2  # train/ without class folders
    lines = err.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines) and outp.getvalue() == ""
    assert str(missing) in lines[0] and str(tmp_path) in lines[1] and str(empty / "train") in lines[2]
    assert not (tmp_path / "out").exists()


def test_rewrite_replaces_old_shards(shards, tmp_path):
    src, _ = shards
    script = load_script()
    out = tmp_path / "out"
    script.make_shards(src, out, SHARD_SIZE, ["val"])
    assert len(list((out / "val").glob("*.tar"))) == 2
    script.make_shards(src, out, 100, ["val"])
    assert sorted(p.name for p in (out / "val").iterdir()) == ["index.json", "val-000000.tar"]
    _, data, exts = expected(src, "val")
    reader = load_shard_split(out / "val").reader
    assert [reader.read(i) for i in range(len(reader))] == list(zip(data, exts))
