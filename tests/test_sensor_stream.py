"""The sensor stream on generated recordings in the real layouts: train.py end to end, windows in
time order, disjoint shares per rank, pacing, prequential scoring and one-line data errors."""

import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ready_datamodule
from generators.sensor_stream import write_intel, write_occupancy
from reference_training import one_process_trainer

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


@pytest.mark.parametrize("source", ["occupancy", "intel"])
def test_stream_yields_windows_in_time_order(stream_data, tmp_path, source):
    datamodule = _datamodule(stream_data, tmp_path, source=source, window=6, batch_size=4)
    batches = _batches(datamodule)
    assert len(batches) > 3
    for batch in batches:
        assert torch.all(batch["time"][1:] >= batch["time"][:-1])
    for earlier, later in zip(batches[:-1], batches[1:]):
        assert earlier["time"].max() < later["time"].min()  # trained on only after it is forecast
    batch = batches[1]  # the target is the reading after the window; the window's last reading is "last"
    series = datamodule.scaled[batch["sensor"]]
    assert torch.equal(batch["target"][:, 0], series[torch.arange(len(series)), batch["time"]])
    assert torch.equal(batch["last"], series[torch.arange(len(series)), batch["time"] - 1])


def test_no_window_spans_the_gap_between_occupancy_files(stream_data, tmp_path):
    datamodule = _datamodule(
        stream_data, tmp_path, source="occupancy", window=6, calibration_fraction=0.05, test_fraction=0.05
    )
    segment = torch.as_tensor(datamodule.recording.segment)
    times = torch.cat([b["time"] for b in _batches(datamodule)])
    assert torch.equal(segment[times - 6], segment[times])
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
    epochs = [torch.cat([b["time"] for b in _batches(datamodule, epoch=e, epochs=3)]) for e in range(3)]
    assert len({len(times) for times in epochs}) == 1
    assert epochs[0].max() < epochs[1].min() and epochs[1].max() < epochs[2].min()


@pytest.mark.parametrize("source, batch_size, rate", [("occupancy", 8, 300.0), ("intel", 12, 80.0)])
def test_paced_stream_keeps_its_rate(stream_data, tmp_path, source, batch_size, rate):
    """Readings (time steps of the rank's sensors) arrive at --stream-rate within 10% over ~1.4 s of
    stream, while training on each batch takes half the time its readings take to arrive: a pacing
    that slept a fixed interval after each batch, instead of waiting for arrival times, would fall
    a third behind."""
    datamodule = _datamodule(stream_data, tmp_path, source=source, window=6, batch_size=batch_size, stream_rate=rate)
    served = []  # (when, the last reading the batch needs: its last target)
    for batch in _rank(datamodule, 0, 1).train_dataloader():
        served.append((time.monotonic(), int(batch["time"].max())))
        steps = len(batch["time"]) // len(set(batch["sensor"].tolist()))
        time.sleep(0.5 * steps / rate)  # "training" on the batch
    (started, first), (ended, last) = served[0], served[-1]
    assert last - first > rate  # more than a second of stream
    assert (last - first) / (ended - started) == pytest.approx(rate, rel=0.1)


def test_negative_stream_rate_is_one_line(one_line_error):
    err = one_line_error("--model", "lstm", "--data", "sensor-stream", "--stream-rate", "-1")
    assert "--stream-rate" in err


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
