"""CNN on CIFAR-10: both on-disk layouts, the split, augmentation, the pipeline contract, train.py runs, errors."""

import shutil

import numpy as np
import pytest
import torch
from generators.cifar10 import CLASSES, class_colour, write_cifar10_batches, write_cifar10_jpegs

from lightning_xd.datamodules import cifar10
from lightning_xd.datamodules.cifar10 import CIFAR10DataModule, normalise, random_crop_and_flip
from lightning_xd.models.cnn import CNN

TRAIN_PER_CLASS, TEST_PER_CLASS, VAL_SIZE = 4, 2, 10


@pytest.fixture(scope="module")
def cifar_jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_jpg_data")
    write_cifar10_jpegs(root, TRAIN_PER_CLASS, TEST_PER_CLASS)
    return root


def _datamodule(root, tmp_path, **options):
    dm = CIFAR10DataModule(str(root), str(tmp_path / "cache"), val_size=VAL_SIZE, **options)
    dm.prepare_data()
    dm.setup()
    return dm


def _mean_colour(images: torch.Tensor) -> np.ndarray:
    return images.float().mean(dim=(0, 2, 3)).numpy()


def test_jpegs_decode_to_rgb_with_folder_labels(cifar_jpegs, tmp_path):
    dm = _datamodule(cifar_jpegs, tmp_path)
    (images, labels), (test_images, test_labels) = dm.data["train"], dm.data["test"]
    assert images.dtype == torch.uint8 and images.shape == (10 * TRAIN_PER_CLASS, 3, 32, 32)
    assert test_images.shape == (10 * TEST_PER_CLASS, 3, 32, 32)
    assert dm.data["classes"] == list(CLASSES) and dm.model_kwargs() == {"num_classes": 10}
    for label in range(10):  # channels in RGB order, labels from the folder names
        assert np.abs(_mean_colour(images[labels == label]) - class_colour(label)).max() < 6
        assert np.abs(_mean_colour(test_images[test_labels == label]) - class_colour(label)).max() < 6


def test_split_is_fixed_disjoint_and_covers_the_training_images(cifar_jpegs, tmp_path):
    dm = _datamodule(cifar_jpegs, tmp_path)
    train_index, val_index = dm.split()
    assert len(val_index) == VAL_SIZE and len(dm.val_set) == VAL_SIZE
    assert len(dm.train_set) == 10 * TRAIN_PER_CLASS - VAL_SIZE and len(dm.test_set) == 10 * TEST_PER_CLASS
    assert set(train_index.tolist()).isdisjoint(val_index.tolist())
    assert sorted(train_index.tolist() + val_index.tolist()) == list(range(10 * TRAIN_PER_CLASS))
    again = _datamodule(cifar_jpegs, tmp_path)  # same seed, same split: every rank and run agree
    assert torch.equal(again.split()[1], val_index)
    other = _datamodule(cifar_jpegs, tmp_path, split_seed=1)
    assert not torch.equal(other.split()[1], val_index)
    assert dm.train_set.augment and not dm.val_set.augment and not dm.test_set.augment


def test_decoded_once_then_read_from_the_cache(cifar_jpegs, tmp_path, monkeypatch):
    _datamodule(cifar_jpegs, tmp_path)
    monkeypatch.setattr(cifar10, "decode_jpeg", lambda path: pytest.fail("decoded again"))
    assert len(_datamodule(cifar_jpegs, tmp_path).train_set) == 10 * TRAIN_PER_CLASS - VAL_SIZE


def test_official_python_batches(tmp_path):
    write_cifar10_batches(tmp_path / "data", per_batch=20)
    dm = _datamodule(tmp_path / "data", tmp_path)
    (images, labels), (test_images, _) = dm.data["train"], dm.data["test"]
    assert images.shape == (5 * 20, 3, 32, 32) and test_images.shape == (20, 3, 32, 32)
    for label in range(10):  # rows are R, G, B planes
        assert np.abs(_mean_colour(images[labels == label]) - class_colour(label)).max() < 6


def test_normalisation_and_augmentation_keep_the_shape_and_vary():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    x = normalise(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.manual_seed(0)
    views = torch.stack([random_crop_and_flip(x) for _ in range(20)])
    assert views.shape == (20, 3, 32, 32)
    assert len({v.sum().item() for v in views}) > 1  # crops differ
    normalised = normalise(torch.full((3, 1, 1), 128, dtype=torch.uint8)).flatten()
    assert torch.allclose(normalised, (128 / 255 - cifar10.MEAN.flatten()) / cifar10.STD.flatten())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # a step called outside a Trainer
def test_pipeline_blocks_are_the_model():
    model = CNN(num_classes=10).eval()
    stages = model.pipeline_blocks()
    sizes = [sum(p.numel() for p in stage.parameters()) for stage in stages]
    assert len(stages) >= 4 and sum(sizes) == sum(p.numel() for p in model.parameters())
    assert max(sizes) < 2.5 * min(sizes), sizes  # roughly balanced
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    h = model.pipeline_input(batch)
    for stage in stages:
        h = stage(h, batch)
    assert torch.allclose(h, model(batch[0]))
    calls = []
    for stage in stages:
        stage.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    model.training_step(batch, 0)  # the step runs through the stages
    assert len(calls) == len(stages)


def test_missing_data_names_both_layouts(data_error, tmp_path):
    err = data_error("cnn", tmp_path / "empty")
    assert "cifar10_jpg" in err and "cifar-10-batches-py" in err


def test_corrupt_jpeg_names_the_file(data_error, cifar_jpegs, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(cifar_jpegs, broken)
    (broken / "cifar10_jpg" / "test" / "cat" / "0001.jpg").write_bytes(b"not a jpeg")
    err = data_error("cnn", broken)
    assert "cat/0001.jpg" in err and "not a decodable JPEG" in err


def test_corrupt_python_batch_names_the_file(data_error, tmp_path):
    folder = write_cifar10_batches(tmp_path / "data", per_batch=10)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    err = data_error("cnn", tmp_path / "data")
    assert "data_batch_3" in err and "not a CIFAR-10 python batch" in err
    (folder / "test_batch").unlink()
    err = data_error("cnn", tmp_path / "data")
    assert "missing test_batch" in err
