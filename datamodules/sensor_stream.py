"""Room-temperature readings replayed as a live stream, for prequential (test-then-train) forecasting.

Data (see ../shared/data/SOURCES.md), chosen with ``--source``:
- ``occupancy``: one office's temperature once a minute, 2015-02-02 to 2015-02-18, from
  ``occupancy_detection/{datatest,datatraining,datatest2}.txt`` read in that (time) order
  (Candanedo and Feldheim, Energy and Buildings 2016). The files are separated by gaps of ~7 h
  and ~29 h; no window spans a gap.
- ``intel``: 50 sensors of the Intel Berkeley lab every 30 minutes, 240 steps, from
  ``intel_lab_preprocessed/intelTemperature{Train,Test}.csv`` (rows = sensors; Train then Test).
Reference: a streaming forecaster must beat the baselines of ``forecast_baselines``
(persistence, seasonal naive, a ridge autoregression fitted on the calibration stretch), scored
on exactly the same windows; example 8's bar is an RMSE 10% below the best of them.

Time is cut into a calibration stretch (the first ``calibration_fraction``: it fits the scaling
and the ridge baseline, as a deployment would before going live), the stream, and a held-out tail
(the last ``test_fraction``) that the final model forecasts without learning from it. Each sample
is a window of ``window`` readings of one sensor -> the reading ``horizon`` steps after its last
(minutes for occupancy, half-hours for intel). Each reading of a window comes with its time of
day (sine and cosine), so a model can learn the daily rhythm of heating and occupancy.

Forecast now, learn when the truth arrives (prequential evaluation at any horizon): a training
batch holds the windows ending at its ``batch_size`` newest readings, to forecast (the model
scores them before its optimizer step and learns nothing from them yet), and the windows whose
targets arrived since the previous batch, to learn from (the batch's ``learn`` mask). A window
is learned ``horizon`` readings after it was forecast, so no forecast is made by a model that
has seen its target, or any reading after its origin. With ``replay_windows`` R, each batch
also relearns R windows drawn from those the rank learned before (rehearsal: a deployment keeps
its recent history), which makes one pass over a stream learn more from it. With
``calibration_epochs`` K, the first epoch starts with K passes over the calibration stretch's
windows (each rank its share, learning only, unpaced): the model calibrates on the history the
ridge baseline is fitted on, before the stream goes live.

Each rank replays its own share, in time order: its own sensors (every num_ranks-th, the same
count on every rank) or, for a single sensor, its own contiguous stretch of time. A batch holds
``batch_size`` consecutive time steps of all the rank's sensors, so no batch trains on a reading
another batch still has to forecast, and every rank yields the same number of batches. The
recording is streamed once per run: Lightning's epochs are consecutive stretches of it.

Pacing (``--stream-rate R``, readings per second; 0 replays as fast as training takes them) makes
training run as the data arrives. A reading is one time step of the rank's own sensors: the
values of all of them at that step (one value for a single sensor). Each rank receives its own
readings at R per second, so a job of N ranks takes in N x R readings a second in all. The
stream's first reading (the last of its first window; the readings before it are history, there
from the start) arrives when the rank starts reading, and every later time step t of the
recording ``(t - first) / R`` seconds after it, gaps between files taking no time; readings of
later epochs follow on the same clock. A batch is served once its newest reading (the last of
its newest forecast window, and the last target it learns from) has arrived; if training falls
behind, arrived readings wait and are served at once, none dropped. Only the training stream is
paced: the held-out tail is scored at once.
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
from lightning_xd.datamodules.forecast_baselines import (
    BASELINES,
    MINUTES_PER_DAY,
    fit_ridge,
    ridge,
    seasonal_naive,
    window_offsets,
)
from lightning_xd.errors import DataError, UserError
from lightning_xd.launch.registry import DATAMODULES

OCCUPANCY_FILES = ("datatest.txt", "datatraining.txt", "datatest2.txt")  # in time order
INTEL_FILES = ("intelTemperatureTrain.csv", "intelTemperatureTest.csv")
SOURCES = {"occupancy": ("occupancy_detection", OCCUPANCY_FILES), "intel": ("intel_lab_preprocessed", INTEL_FILES)}
INTEL_MINUTES_PER_STEP = 30
RECORDING_LAYOUT = 2  # (sensors, segment, minutes): part of the cache key, so older entries are not read


class Recording:
    """Readings of ``sensors`` (S, T) on a common time axis; ``segment`` (T,) numbers the unbroken
    stretches; ``minutes`` (T,) is each time step's clock time in minutes since midnight of the first day."""

    def __init__(self, sensors: np.ndarray, segment: np.ndarray, minutes: np.ndarray):
        self.sensors, self.segment, self.minutes = sensors, segment, minutes

    @property
    def num_times(self) -> int:
        return self.sensors.shape[1]


def read_occupancy(paths: list[Path]) -> Recording:
    """The Temperature column of the three files, in time order; each file is one unbroken stretch."""
    import pandas as pd

    expected = "the UCI Occupancy Detection layout (a quoted header with date and Temperature, one row a minute)"
    temperatures, segments, times, previous_end = [], [], [], None
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
        times.append(stamps.to_numpy())
    stamps = np.concatenate(times)
    midnight = stamps[0].astype("datetime64[D]")
    minutes = np.round((stamps - midnight) / np.timedelta64(1, "m")).astype(np.int64)  # readings come ~1 min apart
    return Recording(np.concatenate(temperatures)[None, :], np.concatenate(segments), minutes)


def read_intel(paths: list[Path]) -> Recording:
    """The 50 sensors' temperatures, the training then the test file's steps, one unbroken stretch.

    The files give no clock: step t is taken to be 30 t minutes after a midnight."""
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
    num_times = sensors.shape[1]
    return Recording(sensors, np.zeros(num_times, dtype=np.int64), INTEL_MINUTES_PER_STEP * np.arange(num_times))


class Windows:
    """Builds samples from the scaled readings: the windows ending at given (sensor, time) pairs.

    A sample's inputs are, for each of its ``window`` readings, the reading relative to the
    window's last one, the change from the reading before, and the time of day (sine, cosine): the
    model learns how temperature moves whatever its level (levels drift between files and
    sensors) and at what hour it moves. Its target is the reading ``horizon`` steps after the
    last; ``last`` (persistence's forecast) and each baseline's forecast come with it.
    """

    def __init__(
        self,
        readings: torch.Tensor,
        minutes: np.ndarray,
        window: int,
        horizon: int,
        baselines: dict[str, torch.Tensor],
    ):
        self.readings, self.window, self.horizon, self.baselines = readings, window, horizon, baselines
        angle = torch.as_tensor(2 * np.pi * (minutes % MINUTES_PER_DAY) / MINUTES_PER_DAY, dtype=torch.float32)
        self.time_of_day = torch.stack([angle.sin(), angle.cos()], dim=1)  # (T, 2)

    def samples(self, sensor_ids: list[int], ends: np.ndarray, learn: np.ndarray | None = None) -> dict:
        """Every sensor's windows ending at each of ``ends``, time-major; ``learn`` marks the ends to train on."""
        times = torch.as_tensor(ends).repeat_interleave(len(sensor_ids))
        sensors = torch.as_tensor(sensor_ids).repeat(len(ends))
        span = times.unsqueeze(1) + torch.as_tensor(window_offsets(self.window))
        levels = self.readings[sensors.unsqueeze(1), span]
        last = levels[:, -1]
        changes = levels.diff(dim=1, prepend=levels[:, :1])
        inputs = torch.cat([torch.stack([levels - last.unsqueeze(1), changes], dim=2), self.time_of_day[span]], dim=2)
        learn = np.zeros(len(ends), dtype=bool) if learn is None else learn
        return {
            "window": inputs,
            "target": self.readings[sensors, times + self.horizon].unsqueeze(1),
            "last": last,
            "time": times,  # the forecast's origin: its window's last reading
            "sensor": sensors,
            "learn": torch.as_tensor(learn).repeat_interleave(len(sensor_ids)),
            **{f"baseline_{name}": forecast[sensors, times].unsqueeze(1) for name, forecast in self.baselines.items()},
        }


class SensorStream(IterableDataset):
    """The stream of one rank: its window ends ``ends`` in time order, ``steps`` of them a batch.

    ``stretch()`` gives (epoch, epochs): the ends are cut into ``epochs`` equal stretches and an
    epoch replays its own one. With ``learning``, a batch also holds the windows whose targets
    arrived since the previous batch and ``replay`` earlier ones (see the module docstring);
    without it (the held-out tail) it holds only windows to forecast. The first epoch starts with
    batches that only learn, from ``warmup`` (window ends of the calibration stretch), unpaced: that
    history is there before the stream goes live. With ``rate`` > 0, time step t arrives
    ``(t - first) / rate`` seconds after the first reading the stream serves (``first``), on a
    monotonic clock.
    """

    def __init__(
        self,
        windows: Windows,
        sensor_ids: list[int],
        ends: np.ndarray,
        steps: int,
        stretch: Callable[[], tuple[int, int]] = lambda: (0, 1),
        rate: float = 0.0,
        learning: bool = False,
        replay: int = 0,
        warmup: np.ndarray | None = None,
    ):
        self.windows, self.sensor_ids, self.ends, self.steps = windows, sensor_ids, ends, steps
        self.stretch, self.rate, self.learning, self.replay = stretch, rate, learning, replay
        self.warmup = np.zeros(0, dtype=np.int64) if warmup is None else warmup
        self.clock: tuple[float, int] | None = None  # (monotonic time, time step) of the first reading

    def _ends_of_this_epoch(self) -> np.ndarray:
        epoch, epochs = self.stretch()
        if epochs == 1:
            return self.ends
        length = len(self.ends) // epochs // self.steps * self.steps  # whole batches, the same every epoch
        return self.ends[epoch * length : (epoch + 1) * length]

    def _warmup_of_this_epoch(self) -> np.ndarray:
        return self.warmup if self.stretch()[0] == 0 else self.warmup[:0]

    def __len__(self) -> int:
        return -(-len(self._warmup_of_this_epoch()) // self.steps) + -(-len(self._ends_of_this_epoch()) // self.steps)

    def __iter__(self) -> Iterator[dict]:
        warmup = self._warmup_of_this_epoch()
        for first in range(0, len(warmup), self.steps):
            learn = warmup[first : first + self.steps]
            yield self.windows.samples(self.sensor_ids, learn, np.ones(len(learn), dtype=bool))
        ends = self._ends_of_this_epoch()
        if self.rate > 0 and self.clock is None and len(ends):
            self.clock = (time.monotonic(), int(ends[0]))
        for first in range(0, len(ends), self.steps):
            forecast = ends[first : first + self.steps]
            if self.rate > 0:
                self._wait_for_reading(int(forecast[-1]))
            learn = self._to_learn(forecast) if self.learning else forecast[:0]
            yield self.windows.samples(
                self.sensor_ids,
                np.concatenate([learn, forecast]),
                np.concatenate([np.ones(len(learn), dtype=bool), np.zeros(len(forecast), dtype=bool)]),
            )

    def _to_learn(self, forecast: np.ndarray) -> np.ndarray:
        """The window ends whose targets arrived since the previous batch, and ``replay`` learned before.

        The previous batch (the one before ``forecast`` in time, whichever epoch served it) ended at
        the rank's end before ``forecast[0]``: derived, not remembered, so a resumed run learns the same."""
        horizon = self.windows.horizon
        before = np.searchsorted(self.ends, forecast[0])
        previous = self.ends[before - 1] if before else -1
        targets = self.ends + horizon
        arrived = self.ends[(targets > previous) & (targets <= forecast[-1])]
        learned = self.ends[targets <= previous]
        if self.replay == 0 or len(learned) == 0:
            return arrived
        rng = np.random.default_rng(int(forecast[0]))  # the same draw on a re-run
        return np.concatenate([np.sort(rng.choice(learned, min(self.replay, len(learned)), replace=False)), arrived])

    def _wait_for_reading(self, time_step: int) -> None:
        """Sleep until reading ``time_step`` has arrived. Its arrival is reckoned from the first
        reading, not from the previous wait, so the time training takes never adds up to drift."""
        started, first = self.clock
        arrival = started + (time_step - first) / self.rate
        while (delay := arrival - time.monotonic()) > 0:
            time.sleep(delay)


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
        horizon: int = 1,
        replay_windows: int = 0,
        calibration_epochs: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise UserError(f"--source {source!r} is not one of {', '.join(SOURCES)}")
        if stream_rate < 0:
            raise UserError(f"--stream-rate must be readings per second (0: as fast as possible), got {stream_rate}")
        self.data_dir, self.cache, self.batch_size = Path(data_dir), cache_dir, batch_size
        self.source, self.window = source, window
        self.calibration_fraction, self.test_fraction = calibration_fraction, test_fraction
        self.stream_rate, self.horizon, self.replay_windows = stream_rate, horizon, replay_windows
        self.calibration_epochs = calibration_epochs
        self.recording: Recording | None = None
        self.scaled: torch.Tensor | None = None
        self.windows: Windows | None = None
        self.mean = self.std = None

    def _recording(self) -> Recording:
        folder, names = SOURCES[self.source]
        paths = require_files(self.data_dir / folder, names, f"{self.source} temperature stream")
        read = read_occupancy if self.source == "occupancy" else read_intel
        key = digest(paths, source=self.source, layout=RECORDING_LAYOUT)
        cached = cache_dir(self.data_dir, self.cache) / "sensor_stream" / f"{key}.pt"
        arrays = load_or_build(cached, lambda: vars(read(paths)), f"{self.source} readings")  # cached as plain arrays
        return Recording(**arrays)

    def prepare_data(self) -> None:
        self.setup()  # reads (and caches) the recording, checks its stretches and fits the ridge baseline

    def _stretches(self, recording: Recording) -> dict[str, range]:
        """Time ranges of calibration, stream and test; stream and test must hold more than one window."""
        num_times = recording.num_times
        calibration = int(num_times * self.calibration_fraction)
        test = num_times - int(num_times * self.test_fraction)
        stretches = {
            "calibration": range(0, max(calibration, 1)),
            "stream": range(calibration, test),
            "test": range(test, num_times),
        }
        if min(len(stretches["stream"]), len(stretches["test"])) <= self.window + self.horizon:
            raise DataError(
                f"{self.source} readings: {num_times} time steps leave the stream or the test tail "
                f"no longer than --window {self.window} + --horizon {self.horizon}; lower either or give a "
                "longer recording"
            )
        return stretches

    def setup(self, stage: str | None = None) -> None:
        if self.recording is not None:
            return
        self.recording = self._recording()
        calibration = self._stretches(self.recording)["calibration"]
        fitted_on = self.recording.sensors[:, calibration.start : calibration.stop]
        self.mean, self.std = float(fitted_on.mean()), float(fitted_on.std()) or 1.0
        scaled = (self.recording.sensors - self.mean) / self.std
        self.scaled = torch.tensor(scaled, dtype=torch.float32)
        baselines = self._baselines(scaled, calibration)
        self.windows = Windows(self.scaled, self.recording.minutes, self.window, self.horizon, baselines)

    def _baselines(self, scaled: np.ndarray, calibration: range) -> dict[str, torch.Tensor]:
        """Each baseline's forecast at every origin, from the readings up to it (ridge: fitted on the
        windows of the ``calibration`` stretch)."""
        weights = fit_ridge(scaled, self._ends(calibration), self.window, self.horizon)
        forecasts = {
            "seasonal_naive": seasonal_naive(scaled, self.recording.minutes, self.horizon),
            "ridge": ridge(scaled, weights, self.window, self.horizon),
        }
        assert tuple(forecasts) == BASELINES
        return {name: torch.tensor(forecast, dtype=torch.float32) for name, forecast in forecasts.items()}

    def model_kwargs(self) -> dict:
        self.setup()
        return {
            "num_features": 4,  # relative level, change, time of day (sine, cosine)
            "horizon": 1,  # one value: the reading --horizon steps ahead
            "baselines": BASELINES,
            "target_mean": self.mean,
            "target_std": self.std,
            "log_target": False,
            "prequential": True,
            "target_unit": "°C",
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
        """Last readings of the windows inside ``times`` whose window and target (``horizon`` later) are unbroken."""
        ends = np.arange(times.start + self.window - 1, times.stop - self.horizon)
        segment = self.recording.segment
        return ends[segment[ends - self.window + 1] == segment[ends + self.horizon]]

    def _stream(self, name: str, **how) -> SensorStream:
        rank, num_shards = rank_shard(self.trainer)
        sensor_ids, ends = self.shard(self._stretches(self.recording)[name], rank, num_shards)
        steps = max(1, self.batch_size // len(sensor_ids))  # whole time steps: all sensors forecast together
        return SensorStream(self.windows, sensor_ids, ends, steps, **how)

    def _warmup(self) -> np.ndarray:
        """This rank's share of the calibration stretch's windows, ``calibration_epochs`` times in time order."""
        rank, num_shards = rank_shard(self.trainer)
        _, ends = self.shard(self._stretches(self.recording)["calibration"], rank, num_shards)
        return np.tile(ends, self.calibration_epochs)

    def _epoch_stretch(self) -> tuple[int, int]:
        """(this epoch, number of epochs): the stream is cut into one stretch per epoch, never replayed."""
        if self.trainer is None:
            return 0, 1
        epochs = max(self.trainer.max_epochs, 1)  # -1 means "no limit": then one stretch, the whole stream
        return min(self.trainer.current_epoch, epochs - 1), epochs

    def train_dataloader(self) -> DataLoader:
        stream = self._stream(
            "stream",
            stretch=self._epoch_stretch,
            rate=self.stream_rate,
            learning=True,
            replay=self.replay_windows,
            warmup=self._warmup(),
        )
        if len(stream._ends_of_this_epoch()) == 0:
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
