"""UCI Appliances Energy Prediction: a house's appliance energy use (Wh) every 10 minutes,
2016-01-11 17:00 to 2016-05-27 18:00 (19,735 readings).

Data: ``appliances_energy/energydata_complete.csv`` of the data dir (Candanedo, Feldheim and
Deramaix, Energy and Buildings 2017; see ../shared/data/SOURCES.md). That copy has no date
column; the series is contiguous, so row i is 2016-01-11 17:00 + i x 10 min.
Reference: the paper's GBM reaches a test RMSE of ~66 Wh (a different set-up); a persistence
forecast (next = last) scores ~67 Wh RMSE on our test weeks, and the LSTM aims 10% below it.

A sample is a window of the past ``window`` readings -> the next ``horizon`` Appliances values.
Inputs per reading: the past target (log1p, standardised), time of day (sin, cos) and a weekend
flag; the other 25 columns made an LSTM overfit within a few epochs in our trials. The split is
chronological (train, then validation, then test weeks); every window lies inside one part, and
the scaling is fitted on the training part only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_xd.data import cache_dir, digest, eval_sampler, load_or_build, require_files
from lightning_xd.errors import DataError
from lightning_xd.launch.registry import DATAMODULES

CSV = "energydata_complete.csv"
TARGET = "Appliances"
FIRST_READING = "2016-01-11 17:00"
READING_INTERVAL = "10min"


class WindowDataset(Dataset):
    """Windows ``features[s : s + window]`` -> ``target[s + window : s + window + horizon]``."""

    def __init__(self, features: torch.Tensor, target: torch.Tensor, starts: range, window: int, horizon: int):
        self.features, self.target, self.starts = features, target, starts
        self.window, self.horizon = window, horizon

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        end = self.starts[i] + self.window
        return {
            "window": self.features[end - self.window : end],
            "target": self.target[end : end + self.horizon],
            "last": self.target[end - 1],
        }

    def rows(self) -> tuple[int, int]:
        """First and last row any window of this dataset reads (its inputs and targets)."""
        return self.starts[0], self.starts[-1] + self.window + self.horizon - 1


def read_appliances(path: Path) -> np.ndarray:
    """The Appliances column (Wh) of the CSV; a one-line DataError if it is not there or not numbers."""
    import pandas as pd

    expected = f"a CSV with a header row holding an '{TARGET}' column of non-negative Wh readings"
    try:
        column = pd.read_csv(path, usecols=[TARGET])[TARGET]
    except Exception as err:  # not a CSV, no such column, ...
        raise DataError(f"{path} could not be read ({type(err).__name__}); expected {expected}") from None
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if len(bad):
        raise DataError(f"{path}: row {bad[0] + 2} has {TARGET} = {column.iloc[bad[0]]!r}; expected {expected}")
    return values


def calendar_features(num_rows: int) -> np.ndarray:
    """Time of day as (sin, cos) and a weekend flag for each reading, from its rebuilt timestamp."""
    import pandas as pd

    stamps = pd.date_range(FIRST_READING, periods=num_rows, freq=READING_INTERVAL)
    day_fraction = np.asarray(stamps.hour * 60 + stamps.minute) / (24 * 60)
    weekend = np.asarray(stamps.dayofweek >= 5)
    return np.stack([np.sin(2 * np.pi * day_fraction), np.cos(2 * np.pi * day_fraction), weekend], axis=1)


@DATAMODULES.register("appliances")
class AppliancesDataModule(LightningDataModule):
    def __init__(
        self,
        data_dir: str = "./data",
        cache_dir: str | None = None,
        batch_size: int = 64,
        window: int = 36,
        horizon: int = 1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        log_target: bool = True,
    ):
        super().__init__()
        self.data_dir, self.cache, self.batch_size = Path(data_dir), cache_dir, batch_size
        self.window, self.horizon, self.log_target = window, horizon, log_target
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.datasets: dict[str, WindowDataset] = {}
        self.target_mean = self.target_std = None

    @property
    def csv(self) -> Path:
        return require_files(self.data_dir / "appliances_energy", [CSV], "Appliances energy data")[0]

    def _readings(self) -> np.ndarray:
        csv = self.csv
        cached = cache_dir(self.data_dir, self.cache) / "appliances" / f"{digest([csv])}.pt"
        return load_or_build(cached, lambda: read_appliances(csv), "Appliances readings")

    def prepare_data(self) -> None:
        self._split_rows(len(self._readings()))

    def _split_rows(self, num_rows: int) -> dict[str, range]:
        """Consecutive row ranges: training weeks, then validation, then test; each must fit a window."""
        num_test, num_val = int(num_rows * self.test_fraction), int(num_rows * self.val_fraction)
        num_train = num_rows - num_val - num_test
        parts = {
            "train": range(0, num_train),
            "val": range(num_train, num_train + num_val),
            "test": range(num_train + num_val, num_rows),
        }
        needed = self.window + self.horizon
        short = [name for name, rows in parts.items() if len(rows) < needed]
        if short:
            raise DataError(
                f"{self.csv}: {num_rows} rows leave the {', '.join(short)} part(s) shorter than "
                f"--window {self.window} + --horizon {self.horizon}; expected more rows"
            )
        return parts

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        readings = self._readings()
        parts = self._split_rows(len(readings))
        target = np.log1p(readings) if self.log_target else readings
        train_part = target[parts["train"].start : parts["train"].stop]
        self.target_mean, self.target_std = float(train_part.mean()), float(train_part.std()) or 1.0
        scaled = torch.tensor((target - self.target_mean) / self.target_std, dtype=torch.float32)
        features = torch.cat(
            [scaled.unsqueeze(1), torch.tensor(calendar_features(len(readings)), dtype=torch.float32)], dim=1
        )
        span = self.window + self.horizon
        self.datasets = {
            name: WindowDataset(features, scaled, range(rows.start, rows.stop - span + 1), self.window, self.horizon)
            for name, rows in parts.items()
        }

    def model_kwargs(self) -> dict:
        self.setup()
        return {
            "num_features": self.datasets["train"].features.shape[1],
            "horizon": self.horizon,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            "log_target": self.log_target,
            "prequential": False,
            "target_unit": "Wh",
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, shuffle=True)

    def _eval_loader(self, name: str) -> DataLoader:
        dataset = self.datasets[name]
        return DataLoader(dataset, batch_size=256, sampler=eval_sampler(dataset, self.trainer))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
