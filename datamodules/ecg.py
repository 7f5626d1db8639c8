"""ECG5000 heartbeats for anomaly detection: 500 beats of 140 samples each, class 1 = normal,
classes 2-5 = abnormal beats of a patient with severe congestive heart failure.

Data: ``ecg/ecg5000/ECG5000_TRAIN.txt`` of the data dir (UCR archive, Dau et al. 2019, from the
BIDMC Congestive Heart Failure Database; see ../shared/data/SOURCES.md): whitespace-separated
text, the class in column 0, then the 140 z-normalised samples of one beat.
Reference: dense and LSTM autoencoders trained on normal ECG5000 beats reach AUC-ROC ~0.95-0.99
for normal vs abnormal.

The split is fixed by ``split_seed`` and stratified: each class is shuffled and cut into
training, validation and test parts in the same proportions. An autoencoder must only learn what
normal looks like, so the training set keeps the normal beats of its part; validation and test
keep every class, since the anomaly score is judged on both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_xd.data import cache_dir, digest, eval_sampler, load_or_build, require_files
from lightning_xd.errors import DataError
from lightning_xd.launch.registry import DATAMODULES

BEATS_FILE = "ECG5000_TRAIN.txt"
BEAT_LENGTH = 140
CLASSES = (1, 2, 3, 4, 5)
NORMAL = 1


def read_beats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(beats (N, 140) float32, classes (N,) int64); a one-line DataError if the file is not that."""
    expected = f"rows of 1 + {BEAT_LENGTH} whitespace-separated numbers (class 1-5, then the beat)"
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except Exception as err:  # text that is not numbers, ragged rows, ...
        reason = str(err).splitlines()[0][:100] if str(err) else type(err).__name__
        raise DataError(f"{path} could not be read ({reason}); expected {expected}") from None
    if table.shape[1] != 1 + BEAT_LENGTH or len(table) == 0:
        raise DataError(f"{path} has {table.shape[1]} columns in {len(table)} rows; expected {expected}")
    classes = table[:, 0]
    bad = np.flatnonzero(~np.isin(classes, CLASSES))
    if len(bad):
        raise DataError(f"{path}: row {bad[0] + 1} has class {classes[bad[0]]:g}; expected {expected}")
    if not np.isfinite(table).all():
        raise DataError(
            f"{path}: row {np.flatnonzero(~np.isfinite(table).all(1))[0] + 1} holds NaN or inf; expected {expected}"
        )
    return table[:, 1:].astype(np.float32), classes.astype(np.int64)


def stratified_split(
    classes: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Row indices of each part: every class cut in the same proportions, in a seeded random order."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in np.unique(classes):
        rows = rng.permutation(np.flatnonzero(classes == c))
        num_test, num_val = round(len(rows) * test_fraction), round(len(rows) * val_fraction)
        parts["test"].append(rows[:num_test])
        parts["val"].append(rows[num_test : num_test + num_val])
        parts["train"].append(rows[num_test + num_val :])
    return {name: np.sort(np.concatenate(rows)) for name, rows in parts.items()}


@DATAMODULES.register("ecg")
class ECGDataModule(LightningDataModule):
    def __init__(
        self,
        data_dir: str = "./data",
        cache_dir: str | None = None,
        batch_size: int = 16,
        val_fraction: float = 0.2,
        test_fraction: float = 0.3,
        split_seed: int = 0,
    ):
        super().__init__()
        self.data_dir, self.cache, self.batch_size = Path(data_dir), cache_dir, batch_size
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.datasets: dict[str, TensorDataset] = {}

    def _beats(self) -> tuple[np.ndarray, np.ndarray]:
        path = require_files(self.data_dir / "ecg" / "ecg5000", [BEATS_FILE], "ECG5000 beats")[0]
        cached = cache_dir(self.data_dir, self.cache) / "ecg5000" / f"{digest([path])}.pt"
        return load_or_build(cached, lambda: read_beats(path), "ECG5000 beats")

    def prepare_data(self) -> None:
        self._beats()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        beats, classes = self._beats()
        parts = stratified_split(classes, self.val_fraction, self.test_fraction, self.split_seed)
        parts["train"] = parts["train"][classes[parts["train"]] == NORMAL]
        if len(parts["train"]) == 0:
            raise DataError(
                f"no normal (class {NORMAL}) beat in the training part of {BEATS_FILE}; "
                "expected normal beats to train the autoencoder on"
            )
        self.datasets = {
            name: TensorDataset(torch.from_numpy(beats[rows]), torch.from_numpy(classes[rows]))
            for name, rows in parts.items()
        }

    def model_kwargs(self) -> dict:
        return {"num_features": BEAT_LENGTH, "normal_class": NORMAL}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, shuffle=True)

    def _eval_loader(self, name: str) -> DataLoader:
        dataset = self.datasets[name]
        return DataLoader(dataset, batch_size=len(dataset), sampler=eval_sampler(dataset, self.trainer))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
