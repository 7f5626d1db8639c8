"""The sensor stream on generated recordings in the real layouts: windows in time order, learned only
once their target has arrived, disjoint shares per rank, pacing, the baselines, prequential scoring
and one-line data errors."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ready_datamodule
from generators.sensor_stream import write_intel, write_occupancy
from reference_training import one_process_trainer

from lightning_xd.datamodules.forecast_baselines import fit_ridge, ridge, seasonal_naive
from lightning_xd.datamodules.sensor_stream import SensorStreamDataModule
from lightning_xd.models.lstm import LSTMForecaster


@pytest.fixture(scope="module")
def stream_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    write_occupancy(root)
    write_intel(root)
    return root


def _rank(datamodule, rank: int, num_ranks: int, epoch: int = 0, epochs: int = 1):
    datamodule.trainer = SimpleNamespace(
        distributed_sampler_kwargs={"rank": rank, "num_replicas": num_ranks}, current_epoch=epoch, max_epochs=epochs
    )
    return datamodule


def _datamodule(root, tmp_path, **options) -> SensorStreamDataModule:
    return ready_datamodule(SensorStreamDataModule, root, tmp_path, **options)


def _batches(datamodule, rank=0, num_ranks=1, epoch=0, epochs=1) -> list[dict]:
    return list(_rank(datamodule, rank, num_ranks, epoch, epochs).train_dataloader())


def _forecast(batch: dict) -> torch.Tensor:
    return batch["time"][~batch["learn"]]


def _learned(batch: dict) -> torch.Tensor:
    return batch["time"][batch["learn"]]


@pytest.mark.parametrize("source, horizon", [("occupancy", 1), ("intel", 1), ("occupancy", 7)])
def test_stream_forecasts_windows_in_time_order(stream_data, tmp_path, source, horizon):
    datamodule = _datamodule(stream_data, tmp_path, source=source, window=6, batch_size=4, horizon=horizon)
    batches = _batches(datamodule)
    assert len(batches) > 3
    for batch in batches:
        assert torch.all(_forecast(batch)[1:] >= _forecast(batch)[:-1])
    for earlier, later in zip(batches[:-1], batches[1:]):
        assert _forecast(earlier).max() < _forecast(later).min()
    batch = batches[-1]  # the target is the reading `horizon` after the window's last, which is "last"
    series = datamodule.scaled[batch["sensor"]]
    rows = torch.arange(len(series))
    assert torch.equal(batch["target"][:, 0], series[rows, batch["time"] + horizon])
    assert torch.equal(batch["last"], series[rows, batch["time"]])
    hour = batch["window"][:, -1, 2:]  # the time of day of the last reading, as sine and cosine
    assert torch.allclose(hour.norm(dim=1), torch.ones(len(hour)))


@pytest.mark.parametrize("horizon", [1, 5, 20])
def test_a_window_is_learned_once_its_target_has_arrived_and_after_it_was_forecast(stream_data, tmp_path, horizon):
    """No forecast is made by a model that has learned its target (or any later reading): the
    windows a batch learns from have targets no later than its newest reading, and were forecast
    in that batch or an earlier one. Every forecast window is learned exactly once, except the last
    ``horizon`` (their targets come after the stream)."""
    datamodule = _datamodule(stream_data, tmp_path, source="occupancy", window=6, batch_size=4, horizon=horizon)
    batches = _batches(datamodule, rank=1, num_ranks=2, epoch=1, epochs=2)  # learning goes on across epochs
    first = _batches(datamodule, rank=1, num_ranks=2, epoch=0, epochs=2)
    forecast_so_far = set(torch.cat([_forecast(b) for b in first]).tolist())
    learned = torch.cat([_learned(b) for b in first]).tolist()
    for batch in batches:
        newest = int(_forecast(batch).max())
        forecast_so_far |= set(_forecast(batch).tolist())
        assert torch.all(_learned(batch) + horizon <= newest)
        assert set(_learned(batch).tolist()) <= forecast_so_far
        learned += _learned(batch).tolist()
    assert len(learned) == len(set(learned))
    assert sorted(forecast_so_far - set(learned)) == sorted(forecast_so_far)[-horizon:]


def test_replayed_windows_were_learned_before(stream_data, tmp_path):
    datamodule = _datamodule(
        stream_data, tmp_path, source="occupancy", window=6, batch_size=4, horizon=3, replay_windows=5
    )
    learned_before: set[int] = set()
    for batch in _batches(datamodule):
        newest = int(_forecast(batch).max())
        arrived = [t for t in _learned(batch).tolist() if t not in learned_before and t + 3 <= newest]
        replayed = [t for t in _learned(batch).tolist() if t not in arrived]
        assert set(replayed) <= learned_before and len(replayed) == min(5, len(learned_before))
        learned_before |= set(arrived)
    assert learned_before


def test_seasonal_naive_takes_the_same_minute_a_day_earlier_else_the_last_reading():
    minutes = np.array([0, 1, 2, 1440, 1441, 1442, 3000])
    readings = np.array([[10.0, 11, 12, 20, 21, 22, 30]])
    forecast = seasonal_naive(readings, minutes, horizon=1)
    # origin 3 (minute 1440) forecasts minute 1441: the day before that is minute 1, reading 11
    assert forecast[0, 3] == 11 and forecast[0, 4] == 12
    assert forecast[0, 0] == 10 and forecast[0, 5] == 22  # no day before: the last reading
    assert np.isnan(forecast[0, 6])  # nothing to forecast after the last reading


def test_ridge_baseline_fits_the_calibration_windows_in_closed_form():
    rng = np.random.default_rng(0)
    readings = np.cumsum(rng.normal(size=(2, 300)), axis=1)
    window, horizon, ends = 4, 2, np.arange(3, 100)
    weights = fit_ridge(readings, ends, window, horizon, alpha=0.0)
    rows, targets = [], []
    for sensor in range(2):
        for end in ends:
            levels = readings[sensor, end - 3 : end + 1]
            rows.append([*(levels[:-1] - levels[-1]), 1.0])
            targets.append(readings[sensor, end + horizon] - levels[-1])
    expected = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)[0]
    assert np.allclose(weights, expected)
    forecast = ridge(readings, weights, window, horizon)
    assert np.isclose(forecast[1, 50], readings[1, 50] + np.array(rows[len(ends) + 47]) @ weights)
    assert np.isnan(forecast[0, 2]) and np.isnan(forecast[0, -1])


def test_every_window_carries_each_baseline_forecast_made_at_its_origin(stream_data, tmp_path):
    datamodule = _datamodule(stream_data, tmp_path, source="intel", window=6, horizon=2)
    batch = _batches(datamodule)[3]
    for name in ("seasonal_naive", "ridge"):
        forecasts = datamodule.windows.baselines[name]
        assert torch.equal(batch[f"baseline_{name}"][:, 0], forecasts[batch["sensor"], batch["time"]])
        assert torch.isfinite(batch[f"baseline_{name}"]).all()


def test_no_window_spans_the_gap_between_occupancy_files(stream_data, tmp_path):
    datamodule = _datamodule(
        stream_data, tmp_path, source="occupancy", window=6, calibration_fraction=0.05, test_fraction=0.05
    )
    segment = torch.as_tensor(datamodule.recording.segment)
    times = torch.cat([b["time"] for b in _batches(datamodule)])  # the windows' last readings
    assert torch.equal(segment[times - 5], segment[times + 1])
    assert set(segment[times].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("source", ["occupancy", "intel"])
def test_two_ranks_see_disjoint_shares_with_as_many_batches(stream_data, tmp_path, source):
    datamodule = _datamodule(stream_data, tmp_path, source=source, window=6, batch_size=4)
    ranks = [_batches(datamodule, rank, 2) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    sensors = [set(torch.cat([b["sensor"] for b in batches]).tolist()) for batches in ranks]
    times = [set(torch.cat([b["time"] for b in batches]).tolist()) for batches in ranks]
    if source == "intel":
        assert sensors[0].isdisjoint(sensors[1]) and len(sensors[0]) == len(sensors[1]) == 3
    else:
        assert sensors[0] == sensors[1] == {0} and max(times[0]) < min(times[1])


def test_epochs_replay_consecutive_stretches_never_the_same_readings(stream_data, tmp_path):
    datamodule = _datamodule(stream_data, tmp_path, source="occupancy", window=6, batch_size=4)
    epochs = [torch.cat([_forecast(b) for b in _batches(datamodule, epoch=e, epochs=3)]) for e in range(3)]
    assert len({len(times) for times in epochs}) == 1
    assert epochs[0].max() < epochs[1].min() and epochs[1].max() < epochs[2].min()


@pytest.mark.parametrize("source, batch_size, rate", [("occupancy", 8, 300.0), ("intel", 12, 80.0)])
def test_paced_stream_keeps_its_rate(stream_data, tmp_path, source, batch_size, rate):
    """Readings (time steps of the rank's sensors) arrive at --stream-rate within 10% over ~1.4 s of
    stream, while training on each batch takes half the time its readings take to arrive: a pacing
    that slept a fixed interval after each batch, instead of waiting for arrival times, would fall
    a third behind."""
    datamodule = _datamodule(stream_data, tmp_path, source=source, window=6, batch_size=batch_size, stream_rate=rate)
    served = []  # (when, the newest reading the batch needs: its last forecast's last, its last target)
    for batch in _rank(datamodule, 0, 1).train_dataloader():
        served.append((time.monotonic(), int(batch["time"].max())))
        steps = len(_forecast(batch)) // len(set(batch["sensor"].tolist()))
        time.sleep(0.5 * steps / rate)  # "training" on the batch
    (started, first), (ended, last) = served[0], served[-1]
    assert last - first > rate  # more than a second of stream
    assert (last - first) / (ended - started) == pytest.approx(rate, rel=0.1)


def test_negative_stream_rate_is_one_line(one_line_error):
    err = one_line_error("--model", "lstm", "--data", "sensor-stream", "--stream-rate", "-1")
    assert "--stream-rate" in err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--horizon", "130"], "the calibration stretch holds no window"),  # 150 calibration minutes < 24 + 130
        (["--horizon", "400"], "--horizon 400"),  # longer than the test tail
        (["--calibration-fraction", "1.5"], "--calibration-fraction 1.5 is out of range"),
    ],
)
def test_a_horizon_or_stretch_the_recording_cannot_hold_is_one_line(one_line_error, stream_data, flags, expected):
    err = one_line_error(
        "--model", "lstm", "--data", "sensor-stream", "--data-dir", str(stream_data), "--fast-dev-run", *flags
    )
    assert expected in err


def test_running_errors_score_each_window_before_training_on_it(stream_data, tmp_path):
    datamodule = _datamodule(stream_data, tmp_path, source="intel", window=6)
    model = LSTMForecaster(**datamodule.model_kwargs())
    datamodule.trainer = None
    trainer = one_process_trainer(max_steps=1)
    trainer.fit(model, datamodule=datamodule)
    # the head starts at "no change", so the first batch, forecast before its step, scores as persistence
    assert model.running_rmse.compute() == pytest.approx(float(model.running_rmse_persistence.compute()))
    assert model.running_rmse.update_count == 1


def _broken_copy(stream_data, tmp_path, name, content):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(stream_data, root)
    folder = "occupancy_detection" if name.endswith(".txt") else "intel_lab_preprocessed"
    if content is None:
        (root / folder / name).unlink()
    else:
        (root / folder / name).write_text(content)
    return root


@pytest.mark.parametrize(
    "source, name, content, expected",
    [
        ("occupancy", "datatraining.txt", None, "missing datatraining.txt"),
        ("occupancy", "datatest2.txt", '"date","Temperature"\n"1",2015-02-11 14:48:00,warm\n', "could not be read"),
        (
            "occupancy",
            "datatest.txt",
            '"id","date","Temperature"\n"1","2015-02-20 10:00:00",20.1\n',
            "not in time order",
        ),
        ("intel", "intelTemperatureTest.csv", "1.83E+01,1.82E+01\n", "has 1 sensors"),
        ("intel", "intelTemperatureTrain.csv", "1.83E+01,oops\n", "could not be read"),
    ],
)
def test_bad_files_are_one_line(one_line_error, stream_data, tmp_path, monkeypatch, source, name, content, expected):
    monkeypatch.setenv("XD_DOWNLOAD", "0")
    root = _broken_copy(stream_data, tmp_path, name, content)
    err = one_line_error(
        "--model",
        "lstm",
        "--data",
        "sensor-stream",
        "--source",
        source,
        "--data-dir",
        str(root),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert expected in err and name in err


def test_unknown_source_is_one_line(one_line_error):
    err = one_line_error("--model", "lstm", "--data", "sensor-stream", "--source", "weather")
    assert "--source 'weather'" in err


def test_the_loss_covers_the_windows_to_learn_and_the_running_errors_those_forecast():
    model = LSTMForecaster(
        4, 1, target_mean=0.0, target_std=1.0, log_target=False, prequential=True, baselines=("ridge",)
    )
    batch = {
        "target": torch.tensor([[1.0], [2.0], [3.0], [4.0]]),
        "last": torch.zeros(4),
        "learn": torch.tensor([True, True, False, False]),
        "baseline_ridge": torch.tensor([[9.0], [9.0], [3.0], [2.0]]),
    }
    output = torch.tensor([[1.0], [1.0], [3.0], [5.0]], requires_grad=True)
    loss = model.pipeline_loss(output, batch, "train")
    assert loss.item() == pytest.approx(0.5)  # (0 + 1) / 2: the windows to learn only
    loss.backward()
    assert torch.equal(output.grad[2:], torch.zeros(2, 1))  # nothing learned from a forecast not yet due
    assert float(model.running_rmse.compute()) == pytest.approx((1 / 2) ** 0.5)
    assert float(model.running_rmse_baselines["ridge"].compute()) == pytest.approx((4 / 2) ** 0.5)
    assert float(model.running_rmse_persistence.compute()) == pytest.approx((25 / 2) ** 0.5)


def test_the_first_epoch_starts_by_learning_the_calibration_windows_unscored(stream_data, tmp_path):
    datamodule = _datamodule(
        stream_data, tmp_path, source="occupancy", window=6, batch_size=4, horizon=2, calibration_epochs=2
    )
    calibration_end = int(len(datamodule.recording.segment) * 0.1)
    first = _rank(datamodule, 1, 2, epoch=0, epochs=2).train_dataloader()
    batches = list(first)
    assert len(batches) == len(first.dataset)
    warmup = [b for b in batches if b["learn"].all()]
    assert batches[: len(warmup)] == warmup and len(warmup) > 0  # all before the stream's first batch
    learned = torch.cat([b["time"] for b in warmup])
    assert torch.all(learned + 2 < calibration_end)  # history: targets inside the calibration stretch
    assert len(learned) == 2 * len(set(learned.tolist()))  # two passes
    assert not any(b["learn"].all() for b in _batches(datamodule, 1, 2, epoch=1, epochs=2))
