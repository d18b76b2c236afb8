"""Tiny learnable datasets written in the on-disk formats users have (tests must not need real data).

Each class has its own colour; images are that colour plus noise, so a small model learns them in seconds.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.io import write_png

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(n: int, num_classes: int = 10, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, size, size, 3) and labels (n,)."""
    palette = np.random.default_rng(1234).integers(30, 226, size=(num_classes, 3))  # shared by every split
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    noise = rng.normal(0, 30, size=(n, size, size, 3))
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_cifar10_python(root: Path, n_train: int = 500, n_test: int = 200, seed: int = 0) -> Path:
    """ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} as torchvision downloads it."""
    out = Path(root) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    images, labels = make_images(n_train + n_test, seed=seed)
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR rows: R plane, G plane, B plane
    train_parts = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(train_parts, start=1):
        batch = {b"data": flat[idx], b"labels": labels[idx].tolist(), b"batch_label": f"batch {i}".encode()}
        (out / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": flat[n_train:], b"labels": labels[n_train:].tolist(), b"batch_label": b"test"}
    (out / "test_batch").write_bytes(pickle.dumps(test))
    (out / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))
    return Path(root)


def write_image_folder(
    root: Path, splits: dict[str, int], num_classes: int = 10, size: int = 32, seed: int = 0
) -> Path:
    """ROOT/<split>/<class>/<n>.png for each split, e.g. splits={"train": 300, "test": 100}."""
    for j, (split, n) in enumerate(splits.items()):
        images, labels = make_images(n, num_classes, size, seed=seed + j)
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = Path(root) / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            write_png(torch.from_numpy(img).permute(2, 0, 1).contiguous(), str(folder / f"{i:05d}.png"))
    return Path(root)
