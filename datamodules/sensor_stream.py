"""Room-temperature readings replayed as a live stream, for prequential (test-then-train) forecasting.

Data (see ../shared/data/SOURCES.md), chosen with ``--source``:
- ``occupancy``: one office's temperature once a minute, 2015-02-02 to 2015-02-18, from
  ``occupancy_detection/{datatest,datatraining,datatest2}.txt`` read in that (time) order
  (Candanedo and Feldheim, Energy and Buildings 2016). The files are separated by gaps of ~7 h
  and ~29 h; no window spans a gap.
- ``intel``: 50 sensors of the Intel Berkeley lab every 30 minutes, 240 steps, from
  ``intel_lab_preprocessed/intelTemperature{Train,Test}.csv`` (rows = sensors; Train then Test).
Reference: persistence (next = last) is the bar a streaming forecaster must beat; ours aims at a
running RMSE below persistence's on the same readings.

Time is cut into a calibration stretch (the first ``calibration_fraction``: it only fits the
scaling, as a deployment would before going live), the stream, and a held-out tail (the last
``test_fraction``) that the final model forecasts without learning from it. Each sample is a
window of ``window`` readings of one sensor -> the next reading.

Each rank replays its own share, in time order: its own sensors (every num_ranks-th, the same
count on every rank) or, for a single sensor, its own contiguous stretch of time. A batch holds
``batch_size`` consecutive time steps of all the rank's sensors, so no batch trains on a reading
another batch still has to forecast, and every rank yields the same number of batches. The
recording is streamed once per run: Lightning's epochs are consecutive stretches of it.

Pacing (``--stream-rate R``, readings per second; 0 replays as fast as training takes them) makes
training run as the data arrives. A reading is one time step of the rank's own sensors: the
values of all of them at that step (one value for a single sensor). Each rank receives its own
readings at R per second, so a job of N ranks takes in N x R readings a second in all. The
stream's first reading (the target of its first window; the window before it is history, there
from the start) arrives when the rank starts reading, and every later time step t of the
recording ``(t - first) / R`` seconds after it, gaps between files taking no time; readings of
later epochs follow on the same clock. A batch is served once the last reading it needs (its
last target) has arrived; if training falls behind, arrived readings wait and are served at
once, none dropped. Only the training stream is paced: the held-out tail is scored at once.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from lightning_xd.data import cache_dir, digest, load_or_build, rank_shard, require_files
from lightning_xd.errors import DataError, UserError
from lightning_xd.launch.registry import DATAMODULES

OCCUPANCY_FILES = ("datatest.txt", "datatraining.txt", "datatest2.txt")  # in time order
INTEL_FILES = ("intelTemperatureTrain.csv", "intelTemperatureTest.csv")
SOURCES = {"occupancy": ("occupancy_detection", OCCUPANCY_FILES), "intel": ("intel_lab_preprocessed", INTEL_FILES)}


class Recording:
    """Readings of ``sensors`` (S, T) on a common time axis; ``segment`` (T,) numbers the unbroken stretches."""

    def __init__(self, sensors: np.ndarray, segment: np.ndarray):
        self.sensors, self.segment = sensors, segment

    @property
    def num_times(self) -> int:
        return self.sensors.shape[1]


def read_occupancy(paths: list[Path]) -> Recording:
    """The Temperature column of the three files, in time order; each file is one unbroken stretch."""
    import pandas as pd

    expected = "the UCI Occupancy Detection layout (a quoted header with date and Temperature, one row a minute)"
    temperatures, segments, previous_end = [], [], None
    for number, path in enumerate(paths):
        try:
            table = pd.read_csv(path, index_col=0)
            stamps = pd.to_datetime(table["date"], format="%Y-%m-%d %H:%M:%S")
            values = pd.to_numeric(table["Temperature"]).to_numpy(dtype=np.float64)
        except Exception as err:  # not CSV, a missing column, a bad date or number
            raise DataError(f"{path} could not be read ({type(err).__name__}); expected {expected}") from None
        if len(values) == 0 or not np.isfinite(values).all():
            raise DataError(f"{path} has no readings or a missing Temperature; expected {expected}")
        if not stamps.is_monotonic_increasing or (previous_end is not None and stamps.iloc[0] <= previous_end):
            raise DataError(
                f"{path}: readings are not in time order after {', '.join(OCCUPANCY_FILES[:number])}; "
                f"expected {expected}"
            )
        previous_end = stamps.iloc[-1]
        temperatures.append(values)
        segments.append(np.full(len(values), number))
    return Recording(np.concatenate(temperatures)[None, :], np.concatenate(segments))


def read_intel(paths: list[Path]) -> Recording:
    """The 50 sensors' temperatures, the training then the test file's steps, one unbroken stretch."""
    expected = "headerless CSV, one row per sensor, one column per half-hour step"
    parts = []
    for path in paths:
        try:
            parts.append(np.loadtxt(path, delimiter=",", ndmin=2))
        except Exception as err:  # text that is not numbers, ragged rows, ...
            raise DataError(f"{path} could not be read ({type(err).__name__}); expected {expected}") from None
        if not np.isfinite(parts[-1]).all():
            raise DataError(f"{path} holds NaN or inf; expected {expected}")
    if parts[0].shape[0] != parts[1].shape[0]:
        raise DataError(
            f"{paths[1]} has {parts[1].shape[0]} sensors but {paths[0].name} has {parts[0].shape[0]}; "
            f"expected the same sensors in both"
        )
    sensors = np.concatenate(parts, axis=1)
    return Recording(sensors, np.zeros(sensors.shape[1], dtype=np.int64))


class SensorStream(IterableDataset):
    """Windows of ``sensors`` (S, T) ending at ``ends``, in time order; a batch = ``steps`` ends x all sensors.

    ``stretch()`` gives (epoch, epochs): the ends are cut into ``epochs`` equal stretches and an
    epoch replays its own one. With ``rate`` > 0, time step t arrives ``(t - first) / rate``
    seconds after the first reading the stream serves (``first``), on a monotonic clock.
    """

    def __init__(
        self,
        sensors: torch.Tensor,
        sensor_ids: list[int],
        ends: np.ndarray,
        window: int,
        steps: int,
        stretch: Callable[[], tuple[int, int]] = lambda: (0, 1),
        rate: float = 0.0,
    ):
        self.sensors, self.sensor_ids, self.ends = sensors, sensor_ids, ends
        self.window, self.steps, self.stretch, self.rate = window, steps, stretch, rate
        self.clock: tuple[float, int] | None = None  # (monotonic time, time step) of the first reading

    def _ends_of_this_epoch(self) -> np.ndarray:
        epoch, epochs = self.stretch()
        if epochs == 1:
            return self.ends
        length = len(self.ends) // epochs // self.steps * self.steps  # whole batches, the same every epoch
        return self.ends[epoch * length : (epoch + 1) * length]

    def __len__(self) -> int:
        return -(-len(self._ends_of_this_epoch()) // self.steps)

    def __iter__(self) -> Iterator[dict]:
        ends = self._ends_of_this_epoch()
        if self.rate > 0 and self.clock is None and len(ends):
            self.clock = (time.monotonic(), int(ends[0]) + 1)
        for first in range(0, len(ends), self.steps):
            batch_ends = ends[first : first + self.steps]
            if self.rate > 0:
                self._wait_for_reading(int(batch_ends[-1]) + 1)  # the batch's last target
            yield self._batch(batch_ends)

    def _wait_for_reading(self, time_step: int) -> None:
        """Sleep until reading ``time_step`` has arrived. Its arrival is reckoned from the first
        reading, not from the previous wait, so the time training takes never adds up to drift."""
        started, first = self.clock
        arrival = started + (time_step - first) / self.rate
        while (delay := arrival - time.monotonic()) > 0:
            time.sleep(delay)

    def _batch(self, ends: np.ndarray) -> dict:
        """Windows of every sensor ending at each of ``ends``, time-major, and the readings that follow them.

        Inputs are relative to the window's last reading (and step-to-step changes), so the model
        learns how temperature moves whatever its level: levels drift between files and sensors.
        """
        times = torch.as_tensor(ends).repeat_interleave(len(self.sensor_ids))
        sensors = torch.as_tensor(self.sensor_ids).repeat(len(ends))
        levels = self.sensors[sensors.unsqueeze(1), times.unsqueeze(1) + torch.arange(-self.window + 1, 1)]
        last = levels[:, -1]
        changes = levels.diff(dim=1, prepend=levels[:, :1])
        return {
            "window": torch.stack([levels - last.unsqueeze(1), changes], dim=2),
            "target": self.sensors[sensors, times + 1].unsqueeze(1),
            "last": last,
            "time": times + 1,
            "sensor": sensors,
        }


@DATAMODULES.register("sensor-stream")
class SensorStreamDataModule(LightningDataModule):
    def __init__(
        self,
        data_dir: str = "./data",
        cache_dir: str | None = None,
        batch_size: int = 8,
        source: str = "occupancy",
        window: int = 24,
        calibration_fraction: float = 0.1,
        test_fraction: float = 0.2,
        stream_rate: float = 0.0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise UserError(f"--source {source!r} is not one of {', '.join(SOURCES)}")
        if stream_rate < 0:
            raise UserError(f"--stream-rate must be readings per second (0: as fast as possible), got {stream_rate}")
        self.data_dir, self.cache, self.batch_size = Path(data_dir), cache_dir, batch_size
        self.source, self.window = source, window
        self.calibration_fraction, self.test_fraction = calibration_fraction, test_fraction
        self.stream_rate = stream_rate
        self.recording: Recording | None = None
        self.scaled: torch.Tensor | None = None
        self.mean = self.std = None

    def _recording(self) -> Recording:
        folder, names = SOURCES[self.source]
        paths = require_files(self.data_dir / folder, names, f"{self.source} temperature stream")
        read = read_occupancy if self.source == "occupancy" else read_intel
        cached = cache_dir(self.data_dir, self.cache) / "sensor_stream" / f"{digest(paths, source=self.source)}.pt"
        arrays = load_or_build(cached, lambda: vars(read(paths)), f"{self.source} readings")  # cached as plain arrays
        return Recording(**arrays)

    def prepare_data(self) -> None:
        self._stretches(self._recording())

    def _stretches(self, recording: Recording) -> dict[str, range]:
        """Time ranges of calibration, stream and test; each must hold more than one window."""
        num_times = recording.num_times
        calibration = int(num_times * self.calibration_fraction)
        test = num_times - int(num_times * self.test_fraction)
        stretches = {
            "calibration": range(0, max(calibration, 1)),
            "stream": range(calibration, test),
            "test": range(test, num_times),
        }
        if min(len(stretches["stream"]), len(stretches["test"])) <= self.window:
            raise DataError(
                f"{self.source} readings: {num_times} time steps leave the stream or the test tail "
                f"no longer than --window {self.window}; expected a longer recording"
            )
        return stretches

    def setup(self, stage: str | None = None) -> None:
        if self.recording is not None:
            return
        self.recording = self._recording()
        calibration = self._stretches(self.recording)["calibration"]
        fitted_on = self.recording.sensors[:, calibration.start : calibration.stop]
        self.mean, self.std = float(fitted_on.mean()), float(fitted_on.std()) or 1.0
        self.scaled = torch.tensor((self.recording.sensors - self.mean) / self.std, dtype=torch.float32)

    def model_kwargs(self) -> dict:
        self.setup()
        return {
            "num_features": 2,
            "horizon": 1,
            "target_mean": self.mean,
            "target_std": self.std,
            "log_target": False,
            "prequential": True,
        }

    def shard(self, times: range, rank: int, num_shards: int) -> tuple[list[int], np.ndarray]:
        """This rank's sensors and window ends in ``times``: as many ends as every other rank has."""
        shares = [self._share(times, r, num_shards) for r in range(num_shards)]
        sensor_ids, ends = shares[rank]
        return sensor_ids, ends[: min(len(e) for _, e in shares)]

    def _share(self, times: range, rank: int, num_shards: int) -> tuple[list[int], np.ndarray]:
        num_sensors = self.recording.sensors.shape[0]
        if num_sensors >= num_shards:  # deal the sensors out; each rank gets the same number
            return list(range(rank, num_sensors, num_shards))[: num_sensors // num_shards], self._ends(times)
        length = len(times) // num_shards  # one sensor: each rank replays its own stretch of time
        return list(range(num_sensors)), self._ends(times[rank * length : (rank + 1) * length])

    def _ends(self, times: range) -> np.ndarray:
        """Last readings of the windows inside ``times`` whose window and next reading are unbroken."""
        ends = np.arange(times.start + self.window - 1, times.stop - 1)
        segment = self.recording.segment
        return ends[segment[ends - self.window + 1] == segment[ends + 1]]

    def _stream(
        self, name: str, stretch: Callable[[], tuple[int, int]] = lambda: (0, 1), rate: float = 0.0
    ) -> SensorStream:
        rank, num_shards = rank_shard(self.trainer)
        sensor_ids, ends = self.shard(self._stretches(self.recording)[name], rank, num_shards)
        steps = max(1, self.batch_size // len(sensor_ids))  # whole time steps: all sensors forecast together
        return SensorStream(self.scaled, sensor_ids, ends, self.window, steps, stretch, rate)

    def _epoch_stretch(self) -> tuple[int, int]:
        """(this epoch, number of epochs): the stream is cut into one stretch per epoch, never replayed."""
        if self.trainer is None:
            return 0, 1
        epochs = max(self.trainer.max_epochs, 1)  # -1 means "no limit": then one stretch, the whole stream
        return min(self.trainer.current_epoch, epochs - 1), epochs

    def train_dataloader(self) -> DataLoader:
        stream = self._stream("stream", self._epoch_stretch, self.stream_rate)
        if len(stream) == 0:
            raise UserError(
                f"the {self.source} stream gives each rank {len(stream.ends)} windows: too few for "
                f"--max-epochs {self._epoch_stretch()[1]} of --batch-size {self.batch_size}; "
                "lower either"
            )
        # the stream is read in the main process (no loader workers), where its __len__ is exact
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> list:
        return []  # a stream is scored as it goes (prequentially), not on a held-out stretch per epoch

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._stream("test"), batch_size=None)
