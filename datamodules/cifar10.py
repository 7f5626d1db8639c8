"""CIFAR-10: 32x32 colour images of 10 classes (Krizhevsky, 2009).

Data: either the ImageFolder JPEG layout ``cifar10_jpg/{train,test}/<class>/NNNN.jpg`` (the copy in
../shared/data holds 10,000 training and all 10,000 test images, re-encoded as JPEG; see its
SOURCES.md), or the official python batches ``cifar-10-batches-py/{data_batch_1..5,test_batch}``
when that is what the data dir holds (they win when both are there: they are the lossless originals).
The batches are pickles: they are opened only when their md5 sums are the release's (the sums its
publisher lists; ``--trust-data-dir`` accepts other batches) and then read by a restricted
unpickler that builds nothing but arrays, lists and bytes (``safe_loading.load_plain_pickle``).
JPEGs are decoded once with OpenCV into a uint8 tensor cache keyed by the file list, sizes and
modification times. Class ids are the sorted folder names, which give the standard ids (airplane = 0).
Reference: a small CNN with batch norm and crop/flip augmentation reaches ~75-80% test accuracy
(the PyTorch "blitz" CNN without them ~54%).

A fixed, seeded ``val_size`` of the training images is held out for validation; the test set is
the 10,000 official test images. Training images are randomly cropped (padding 4) and flipped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_xd.data import cache_dir, digest, eval_sampler, load_or_build, require_files
from lightning_xd.downloads import check_known_release
from lightning_xd.errors import DataError, UserError
from lightning_xd.launch.registry import DATAMODULES
from lightning_xd.progress import progress
from lightning_xd.safe_loading import UnsafeFileError, load_plain_pickle

JPEG_FOLDER = "cifar10_jpg"
PICKLE_FOLDER = "cifar-10-batches-py"
PICKLE_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
# md5 of the python batches of cifar-10-python.tar.gz, as its publisher and torchvision list them
RELEASE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
# what a batch is made of: a dict of numpy arrays, lists and bytes (which Python 3's protocol-2
# pickles spell as _codecs.encode)
BATCH_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),
}
# per-channel mean and standard deviation of the 50,000 CIFAR-10 training images
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
SIZE, PADDING = 32, 4


def normalise(image: torch.Tensor) -> torch.Tensor:
    return (image.float() / 255 - MEAN) / STD


def random_crop_and_flip(image: torch.Tensor) -> torch.Tensor:
    """A random 32x32 crop of the image padded by 4 on each side, mirrored half of the time."""
    # reflected borders look like image content; zero borders would teach the net a frame
    padded = F.pad(image[None], (PADDING,) * 4, mode="reflect")[0]
    top, left = torch.randint(0, 2 * PADDING + 1, (2,)).tolist()
    crop = padded[:, top : top + SIZE, left : left + SIZE]
    return crop.flip(-1) if torch.rand(()) < 0.5 else crop


class Images(Dataset):
    """uint8 images normalised on access; augmented ones get a fresh crop and flip every time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = normalise(self.images[index])
        return (random_crop_and_flip(image) if self.augment else image), self.labels[index]


def _one_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:120]


def class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"CIFAR-10 JPEG layout: missing folder {split_dir} (expected {split_dir}/<class>/*.jpg)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"CIFAR-10 JPEG layout: no class folders in {split_dir} (expected {split_dir}/<class>/*.jpg)")
    return classes


def jpeg_listing(root: Path, classes: list[str], split: str) -> list[tuple[Path, int]]:
    """(file, class id) of every JPEG of a split, in a fixed order."""
    files = [
        (path, label) for label, name in enumerate(classes) for path in sorted((root / split / name).glob("*.jpg"))
    ]
    if not files:
        raise DataError(f"CIFAR-10 JPEG layout: no .jpg files under {root / split}")
    return files


def decode_jpeg(path: Path) -> np.ndarray:
    """A 32x32 RGB image (H, W, 3) uint8, or a one-line error naming the file."""
    import cv2

    try:
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    except Exception as err:  # unreadable file
        raise DataError(f"{path} could not be read ({type(err).__name__}: {_one_line(err)})") from None
    if image is None:
        raise DataError(f"{path} is not a decodable JPEG image")
    if image.shape != (SIZE, SIZE, 3):
        raise DataError(f"{path} is {image.shape[1]}x{image.shape[0]}, expected a {SIZE}x{SIZE} colour image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # OpenCV decodes to BGR


def decode_split(files: list[tuple[Path, int]], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.stack([decode_jpeg(path) for path, _ in progress(files, f"decoding CIFAR-10 {split}", len(files))])
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def read_python_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One official pickled batch: ``data`` (N, 3072) uint8 rows of R, G, B planes and ``labels``."""
    expected = "a CIFAR-10 python batch (pickled dict with 'data' (N, 3072) uint8 and 'labels')"
    try:
        batch = load_plain_pickle(path, BATCH_GLOBALS, "CIFAR-10 batch", "replace it with the original", "bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * SIZE * SIZE or len(labels) != len(data):
            raise ValueError(f"data has shape {data.shape} for {len(labels)} labels")
    except UnsafeFileError:
        raise
    except Exception as err:  # not a pickle, wrong keys, wrong shapes
        raise DataError(f"{path} is not {expected} ({type(err).__name__}: {_one_line(err)})") from None
    return torch.from_numpy(data.reshape(-1, 3, SIZE, SIZE).copy()), torch.from_numpy(labels)


def read_python_batches(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(read_python_batch(p) for p in progress(paths, "reading CIFAR-10 batches", len(paths))))
    return torch.cat(images), torch.cat(labels)


def listing_fingerprint(files: list[tuple[Path, int]], root: Path) -> str:
    """A hash of every file's relative path, size and modification time: cheap, and changes with any edit."""
    h = hashlib.sha256()
    for path, _ in files:
        stat = path.stat()
        h.update(f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


@DATAMODULES.register("cifar10")
class CIFAR10DataModule(LightningDataModule):
    def __init__(
        self,
        data_dir: str = "./data",
        cache_dir: str | None = None,
        batch_size: int = 64,
        val_size: int = 1000,
        split_seed: int = 0,
        trust_data_dir: bool | None = None,
    ):
        super().__init__()
        self.trust_data_dir = trust_data_dir
        self.data_dir, self.cache, self.batch_size = Path(data_dir), cache_dir, batch_size
        self.val_size, self.split_seed = val_size, split_seed
        self.data: dict | None = None
        self.train_set = self.val_set = self.test_set = None

    def _decoded(self) -> dict:
        """Images and labels of both splits, from the cache or decoded into it."""
        pickles, jpegs = self.data_dir / PICKLE_FOLDER, self.data_dir / JPEG_FOLDER
        cache = cache_dir(self.data_dir, self.cache) / "cifar10"
        if pickles.is_dir():
            paths = {
                split: require_files(pickles, names, "CIFAR-10 python batches") for split, names in PICKLE_FILES.items()
            }
            check_known_release(pickles, RELEASE_MD5, "CIFAR-10 python batches", self.trust_data_dir, "md5")
            key = digest(paths["train"] + paths["test"], layout="python-batches")
            return load_or_build(cache / f"batches-{key}.pt", lambda: self._read_batches(paths), "CIFAR-10")
        if not jpegs.is_dir():
            raise DataError(
                f"CIFAR-10: neither {jpegs}/{{train,test}}/<class>/*.jpg nor {pickles}/"
                "{data_batch_1..5,test_batch} found (set --data-dir or XD_DATA_DIR)"
            )
        classes = class_folders(jpegs / "train")
        if class_folders(jpegs / "test") != classes:
            raise DataError(f"CIFAR-10 JPEG layout: {jpegs}/test has other class folders than {jpegs}/train")
        files = {split: jpeg_listing(jpegs, classes, split) for split in ("train", "test")}
        key = digest([], layout="jpeg", files=listing_fingerprint(files["train"] + files["test"], jpegs))
        return load_or_build(cache / f"jpeg-{key}.pt", lambda: self._decode_jpegs(files, classes), "CIFAR-10")

    @staticmethod
    def _read_batches(paths: dict) -> dict:
        (train_x, train_y), (test_x, test_y) = (read_python_batches(paths[s]) for s in ("train", "test"))
        classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        return {"train": (train_x, train_y), "test": (test_x, test_y), "classes": classes}

    @staticmethod
    def _decode_jpegs(files: dict, classes: list[str]) -> dict:
        return {
            "train": decode_split(files["train"], "train"),
            "test": decode_split(files["test"], "test"),
            "classes": classes,
        }

    def prepare_data(self) -> None:
        self._check_val_size(len(self._decoded()["train"][1]))

    def _check_val_size(self, training_images: int) -> None:
        if not 0 < self.val_size < training_images:
            raise UserError(
                f"--val-size {self.val_size} must be between 1 and {training_images - 1} "
                "(the number of training images minus one)"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = self._decoded()
        (images, labels), (test_images, test_labels) = self.data["train"], self.data["test"]
        self._check_val_size(len(labels))
        train_index, val_index = self.split()
        self.train_set = Images(images[train_index], labels[train_index], augment=True)
        self.val_set = Images(images[val_index], labels[val_index], augment=False)
        self.test_set = Images(test_images, test_labels, augment=False)

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the training and the held-out validation images: the same on every rank and every run."""
        order = torch.randperm(len(self.data["train"][1]), generator=torch.Generator().manual_seed(self.split_seed))
        return order[self.val_size :], order[: self.val_size]

    def model_kwargs(self) -> dict:
        self.setup()
        return {"num_classes": len(self.data["classes"])}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=256, sampler=eval_sampler(dataset, self.trainer))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
