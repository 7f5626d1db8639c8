"""LSTM forecaster on generated Appliances data in the real CSV layout: train.py end to end, the
chronological split, the rebuilt timestamps, the pipeline contract and one-line data errors."""

import numpy as np
import pytest
import torch
from conftest import ready_datamodule
from generators.appliances import write_appliances

from lightning_xd.datamodules.appliances import AppliancesDataModule
from lightning_xd.models.lstm import LSTMForecaster


@pytest.fixture(scope="module")
def appliances_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("appliances")
    write_appliances(root)
    return root


def _datamodule(root, tmp_path, **options) -> AppliancesDataModule:
    return ready_datamodule(AppliancesDataModule, root, tmp_path, **options)


def test_split_is_chronological_and_scaled_on_training_rows(appliances_data, tmp_path):
    datamodule = _datamodule(appliances_data, tmp_path, window=12)
    rows = {name: dataset.rows() for name, dataset in datamodule.datasets.items()}
    assert rows["train"][1] < rows["val"][0] and rows["val"][1] < rows["test"][0]
    num_train_rows = rows["train"][1] + 1
    wh = np.loadtxt(
        appliances_data / "appliances_energy" / "energydata_complete.csv", delimiter=",", skiprows=1, usecols=0
    )
    assert datamodule.target_mean == pytest.approx(np.log1p(wh[:num_train_rows]).mean())
    sample = datamodule.datasets["test"][0]
    first = datamodule.datasets["test"].starts[0]
    # the window's last target reading and the target are the CSV's rows, in Wh after undoing the scaling
    in_wh = np.expm1(np.array([sample["last"], sample["target"][0]]) * datamodule.target_std + datamodule.target_mean)
    assert in_wh == pytest.approx(wh[first + 11 : first + 13], rel=1e-4)


def test_time_features_follow_the_rebuilt_timestamps(tmp_path):
    write_appliances(tmp_path / "data", num_rows=700)
    features = _datamodule(tmp_path / "data", tmp_path).datasets["train"].features
    hour = 2 * np.pi * 17 / 24  # row 0 is Monday 2016-01-11 17:00
    assert features[0, 1:3].tolist() == pytest.approx([np.sin(hour), np.cos(hour)], abs=1e-6)
    assert features[42, 1:3].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)  # midnight, 7 hours later
    saturday = 4 * 144 + 42  # Saturday 2016-01-16 00:00
    assert features[:saturday, 3].sum() == 0 and features[saturday:, 3].sum() == 700 - saturday


def test_pipeline_blocks_give_the_model_output_and_start_at_persistence(appliances_data, tmp_path):
    datamodule = _datamodule(appliances_data, tmp_path)
    model = LSTMForecaster(**datamodule.model_kwargs())
    stages = model.pipeline_blocks()
    assert len(stages) >= 4
    sizes = [sum(p.numel() for p in stage.parameters()) for stage in stages]
    assert max(sizes) < 1.2 * min(sizes), sizes
    batch = next(iter(datamodule.train_dataloader()))
    h = model.pipeline_input(batch)
    for stage in stages:
        h = stage(h, batch)
    assert torch.equal(h, model(batch))
    assert torch.allclose(h[:, 0], batch["last"])  # the untrained head predicts no change


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "missing energydata_complete.csv"),
        ("Appliances,lights\n60,30\nsixty,30\n", "row 3 has Appliances = 'sixty'"),
        ("Energy,lights\n60,30\n", "could not be read"),
        ("Appliances,lights\n" + "60,30\n" * 20, "20 rows leave"),
    ],
)
def test_bad_csv_is_one_line(bad_file_error, content, expected):
    err = bad_file_error("lstm", "appliances_energy/energydata_complete.csv", content)
    assert expected in err and "energydata_complete.csv" in err
