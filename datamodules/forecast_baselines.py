"""The baselines a streaming forecaster must beat, forecast for every window the stream holds.

A forecast is made at the window's last reading (time ``e``, the "origin") for the reading
``horizon`` steps later (``e + horizon``), from nothing after the origin:

- **persistence**: the reading at ``e + horizon`` equals the reading at ``e`` (next = last).
- **seasonal naive**: it equals the reading at the same time of day one day earlier, where the
  recording has a reading then (within a minute); where it has none (the first day, the gaps
  between files) the forecast falls back to persistence, so every baseline forecasts every window.
- **ridge autoregression**: the change from the last reading is a linear function of the window's
  readings relative to the last one, plus an intercept; the weights minimise squared error plus
  ``alpha`` times their squared norm over the calibration stretch's windows (closed form), fitted
  once before the stream starts, as a deployment would calibrate before going live.

All three work on the scaled readings the model sees, for all sensors at once: arrays (S, T) whose
entry ``[s, e]`` is the forecast made at origin ``e`` for sensor ``s`` (NaN where no window ends).
"""

from __future__ import annotations

import numpy as np

from lightning_xd.errors import DataError

MINUTES_PER_DAY = 24 * 60
BASELINES = ("seasonal_naive", "ridge")  # persistence is the window's last reading, which every batch holds


def window_offsets(window: int) -> np.ndarray:
    """Offsets of a window's readings from its last one: -(window - 1), ..., 0."""
    return np.arange(-window + 1, 1)


def seasonal_naive(readings: np.ndarray, minutes: np.ndarray, horizon: int) -> np.ndarray:
    """Forecast for ``e + horizon``: the reading one day before it, else the reading at ``e``.

    ``minutes`` (T,) are the readings' times in minutes, increasing."""
    num_times = readings.shape[1]
    targets = np.arange(num_times) + horizon
    valid = targets < num_times
    wanted = minutes[np.minimum(targets, num_times - 1)] - MINUTES_PER_DAY
    after = np.clip(np.searchsorted(minutes, wanted), 0, num_times - 1)
    before = np.maximum(after - 1, 0)
    found = np.where(np.abs(minutes[before] - wanted) < np.abs(minutes[after] - wanted), before, after)  # the nearest
    has_day_before = valid & (np.abs(minutes[found] - wanted) <= 1)
    forecast = np.where(has_day_before, readings[:, found], readings)
    forecast[:, ~valid] = np.nan
    return forecast


def _design(readings: np.ndarray, sensors: np.ndarray, ends: np.ndarray, window: int) -> np.ndarray:
    """One row per (sensor, end): the window's readings minus its last (the last, always 0, left out), and 1."""
    levels = readings[sensors[:, None], ends[:, None] + window_offsets(window)]
    return np.concatenate([levels[:, :-1] - levels[:, -1:], np.ones((len(ends), 1))], axis=1)


def fit_ridge(readings: np.ndarray, ends: np.ndarray, window: int, horizon: int, alpha: float = 1.0) -> np.ndarray:
    """Ridge weights from the windows of every sensor ending at ``ends`` (the calibration stretch's)."""
    if len(ends) == 0:
        raise DataError(
            f"the calibration stretch holds no window of --window {window} readings and its reading "
            f"--horizon {horizon} later, to fit the ridge baseline on; lower either or raise --calibration-fraction"
        )
    num_sensors = readings.shape[0]
    sensors, ends = np.repeat(np.arange(num_sensors), len(ends)), np.tile(ends, num_sensors)
    design = _design(readings, sensors, ends, window)
    change = readings[sensors, ends + horizon] - readings[sensors, ends]
    gram = design.T @ design + alpha * np.eye(design.shape[1])
    return np.linalg.solve(gram, design.T @ change)


def ridge(readings: np.ndarray, weights: np.ndarray, window: int, horizon: int) -> np.ndarray:
    """The ridge forecast at every origin with a whole window before it and a reading ``horizon`` after."""
    num_sensors, num_times = readings.shape
    forecast = np.full(readings.shape, np.nan)
    ends = np.arange(window - 1, num_times - horizon)
    for sensor in range(num_sensors):
        design = _design(readings, np.full(len(ends), sensor), ends, window)
        forecast[sensor, ends] = readings[sensor, ends] + design @ weights
    return forecast
