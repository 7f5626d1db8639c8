"""Tiny CIFAR-10 in both real on-disk layouts: ImageFolder JPEGs and the official python batches.

Each class has its own colour (RGB ``class_colour``), with noise, so a test can check both the
labels and that channels come out in RGB order, and a CNN can learn the classes at once.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_colour(label: int) -> np.ndarray:
    """A distinct RGB colour per class, with red, green and blue all different (so BGR is detectable)."""
    return np.array([25 * label + 10, 240 - 20 * label, 60 + 12 * label], dtype=np.int32)


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 32, 32, 3) uint8 RGB images: the class colour plus mild noise (survives JPEG)."""
    noise = rng.integers(-8, 9, (len(labels), 32, 32, 3))
    return np.clip(np.stack([class_colour(y) for y in labels])[:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_cifar10_jpegs(root: Path, train_per_class: int = 4, test_per_class: int = 2, seed: int = 0) -> Path:
    """Write ``root/cifar10_jpg/{train,test}/<class>/NNNN.jpg`` and return ``root/cifar10_jpg``."""
    import cv2

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar10_jpg"
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(_images(np.full(per_class, label), rng)):
                ok, encoded = cv2.imencode(
                    ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
                )
                assert ok
                (folder / split / name / f"{i:04d}.jpg").write_bytes(encoded.tobytes())
    return folder


def write_cifar10_batches(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """Write the official ``cifar-10-batches-py`` pickles (5 training batches and ``test_batch``)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.arange(per_batch) % len(CLASSES)
        rows = _images(labels, rng).transpose(0, 3, 1, 2).reshape(per_batch, -1)  # R plane, G plane, B plane
        # the originals are Python 2 pickles: their keys load as bytes with encoding="bytes"
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels.tolist(),
            b"data": rows,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}, protocol=2))
    return folder
