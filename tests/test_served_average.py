"""Serving the weights' moving average (``--ema-decay``): the same average as torch's EMA, forecasts
(running, test) made with it while training moves the live weights, kept in checkpoints, and refused
with one line where a process does not hold the whole model or takes steps of its own."""

import pytest
import torch
from conftest import ready_datamodule
from generators.sensor_stream import write_intel
from reference_training import one_process_trainer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_xd.datamodules.sensor_stream import SensorStreamDataModule
from lightning_xd.models.lstm import LSTMForecaster
from lightning_xd.models.served_average import ServedAverage

ALMOST_ONE = 1 - 1e-12  # an average that never leaves the initial weights: the untrained model, persistence


@pytest.fixture(scope="module")
def stream_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    write_intel(root)
    return root


def _fit(stream_data, tmp_path, ema_decay: float, steps: int = 12, **trainer_settings):
    datamodule = ready_datamodule(SensorStreamDataModule, stream_data, tmp_path, source="intel", window=6)
    datamodule.trainer = None
    model = LSTMForecaster(**datamodule.model_kwargs(), num_layers=1, lr=0.01, ema_decay=ema_decay)
    trainer = one_process_trainer(max_steps=steps, **trainer_settings)
    trainer.fit(model, datamodule=datamodule)
    return model, trainer, datamodule


def test_the_average_moves_as_torchs_exponential_moving_average():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ours, torchs = ServedAverage(0.9), AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ours.start(module)
    torchs.update_parameters(module)  # its first update copies the weights
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        module(torch.randn(8, 3)).square().mean().backward()
        optimizer.step()
        ours.update(module)
        torchs.update_parameters(module)
    for (name, _), averaged in zip(module.named_parameters(), torchs.module.parameters()):
        torch.testing.assert_close(ours.weights[name], averaged.detach())
    x = torch.randn(5, 3)
    torch.testing.assert_close(ours.forward(module, x), torchs(x).detach())
    assert module.training  # forecasting with the average leaves the module's mode as it was


def test_forecasts_come_from_the_average_while_the_live_weights_train(stream_data, tmp_path):
    served, trainer, datamodule = _fit(stream_data, tmp_path, ALMOST_ONE)
    live, *_ = _fit(stream_data, tmp_path, 0.0)
    head = served.blocks[-1].layers[-1].linear.weight  # zero at the start: the untrained model is persistence
    assert head.abs().sum() > 0, "the live weights trained"
    assert float(served.running_rmse.compute()) == pytest.approx(float(served.running_rmse_persistence.compute()))
    assert float(live.running_rmse.compute()) != pytest.approx(float(live.running_rmse_persistence.compute()))
    [results] = trainer.test(served, datamodule=datamodule, verbose=False)
    assert results["test/rmse"] == pytest.approx(results["test/rmse_persistence"], rel=1e-5)


def test_a_checkpoint_carries_the_average(stream_data, tmp_path):
    model, trainer, _ = _fit(stream_data, tmp_path, 0.5)
    trainer.save_checkpoint(tmp_path / "served.ckpt")
    restored = LSTMForecaster.load_from_checkpoint(tmp_path / "served.ckpt")
    assert restored.served.weights.keys() == model.served.weights.keys()
    for name, weight in model.served.weights.items():
        torch.testing.assert_close(restored.served.weights[name], weight)
        assert not torch.equal(weight, dict(model.named_parameters())[name].detach()), "the average lags"
    restored.served.start(restored)  # a resumed fit goes on from the restored average, not from the weights
    torch.testing.assert_close(restored.served.weights, model.served.weights)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--strategy", "async"], "--ema-decay serves the moving average of the whole model"),
        (["--ema-decay", "1"], "--ema-decay 1 is out of range"),
    ],
)
def test_a_strategy_without_the_whole_model_or_a_decay_of_one_is_one_line(one_line_error, stream_data, flags, expected):
    err = one_line_error(
        "--model",
        "lstm",
        "--data",
        "sensor-stream",
        "--source",
        "intel",
        "--window",
        "6",
        "--data-dir",
        str(stream_data),
        "--fast-dev-run",
        "--ema-decay",
        "0.9",
        *flags,
    )
    assert expected in err


def test_train_py_serves_the_average_through_a_whole_run(stream_data, tmp_path):
    import json

    import train as train_script

    argv = ["--model", "lstm", "--data", "sensor-stream", "--source", "intel", "--window", "6", "--ema-decay", "0.9"]
    argv += ["--max-steps", "6", "--data-dir", str(stream_data), "--run-dir", str(tmp_path / "run")]
    assert train_script.main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["test/rmse"] > 0 and metrics["test/running_rmse"] > 0
    checkpoints = list((tmp_path / "run" / "checkpoints").rglob("*.ckpt"))
    assert checkpoints and all("served_average" in torch.load(c, weights_only=False) for c in checkpoints)
