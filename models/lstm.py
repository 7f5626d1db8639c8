"""LSTM forecaster: a window of past readings in, the next ``horizon`` values of the target out.

The head forecasts the change from the last observed value, initialised to zero, so an untrained
model is exactly the persistence baseline (next = last) and training only has to beat it.
Every metric is in the data's own units (Wh, degrees C): the datamodule gives the scaling it
applied to the target (``target_mean``, ``target_std``, ``log_target``) and the model undoes it.
The same errors of the persistence baseline, on the same windows, are reported beside the model's,
and those of any other baseline whose forecasts the batches carry (``baseline_<name>``, named by the
datamodule's ``baselines``: sensor-stream's seasonal naive and ridge autoregression).

Pipelined (``lightning_xd.models.pipelined``): one block per LSTM layer (the first also projects the readings,
the last also holds the head), so blocks are balanced in parameters and in work; the steps run the
blocks in order, the code path a pipeline strategy runs too.

Training errors are also kept "running": every training window is scored before the optimizer
step that learns from it. On a stream replayed once (``prequential=True``, sensor-stream) that
is prequential evaluation, reported as ``test/running_rmse`` beside ``test/running_rmse_persistence``
(and ``_<baseline>``). A batch with a ``learn`` mask trains only on the windows it marks and
scores only the others: a stream forecasting ``horizon`` readings ahead learns a window only once
its target has arrived, long after it was forecast.

With ``ema_decay`` d > 0 the forecasts that are scored (running, validation, test) come from the
exponential moving average of the weights (``served_average``), in eval mode, while training moves
the live weights: a deployment serves the average and learns with the live model.

Reference: Candanedo et al. 2017 report a GBM test RMSE of ~66 Wh on Appliances (a different
horizon); our worked example's bar is an RMSE at least 10% below persistence on the test weeks.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from lightning_xd.contract import declared
from lightning_xd.errors import UserError
from lightning_xd.launch.registry import MODELS
from lightning_xd.models.pipelined import Block, PipelinedModule
from lightning_xd.models.served_average import ServedAverage


class InputProjection(nn.Module):
    """Readings of one time step -> the LSTM's width."""

    def __init__(self, num_features: int, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(num_features, hidden_size)

    def forward(self, h: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.linear(h)


class ResidualLSTM(nn.Module):
    """One LSTM layer added to its input: a deep stack then trains as easily as a shallow one."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, batch: dict) -> torch.Tensor:
        out, _ = self.lstm(h)
        return h + self.dropout(out)


class ChangeFromLast(nn.Module):
    """Last hidden state -> forecast = last observed target + predicted change (zero at start)."""

    def __init__(self, hidden_size: int, horizon: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, horizon)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor, batch: dict) -> torch.Tensor:
        return batch["last"].unsqueeze(1) + self.linear(h[:, -1])


def error_metrics(prefix: str, postfix: str = "") -> MetricCollection:
    return MetricCollection(
        {"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError()}, prefix=prefix, postfix=postfix
    )


@MODELS.register("lstm", data="appliances", trains_on=("appliances", "sensor-stream"), max_epochs=10)
class LSTMForecaster(PipelinedModule):
    def __init__(
        self,
        num_features: int,
        horizon: int,
        target_mean: float,
        target_std: float,
        log_target: bool,
        prequential: bool,
        baselines: tuple[str, ...] = (),
        target_unit: str = "",
        hidden_size: int = 64,
        num_layers: int = 4,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        ema_decay: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        layers = [ResidualLSTM(hidden_size, dropout) for _ in range(num_layers)]
        parts = [[layer] for layer in layers]
        parts[0].insert(0, InputProjection(num_features, hidden_size))
        parts[-1].append(ChangeFromLast(hidden_size, horizon))
        self.blocks = nn.ModuleList(Block(*p) for p in parts)
        self.metrics = nn.ModuleDict({split: error_metrics(f"{split}/") for split in ("val", "test")})
        self.baseline_names = ("persistence", *baselines)
        self.baseline_metrics = nn.ModuleDict(
            {
                f"{split}_{name}": error_metrics(f"{split}/", f"_{name}")
                for split in ("val", "test")
                for name in self.baseline_names
            }
        )
        # never reset by Lightning: they run over the whole fit
        self.running_rmse = MeanSquaredError(squared=False)
        self.running_rmse_baselines = nn.ModuleDict(
            {name: MeanSquaredError(squared=False) for name in self.baseline_names}
        )
        # with ema_decay, forecasts (running, validation, test) come from the weights' moving average
        self.served = ServedAverage(ema_decay) if ema_decay > 0 else None
        self._averaged_at_step = -1

    # --- pipeline contract -------------------------------------------------------------------
    def pipeline_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def pipeline_input(self, batch: dict) -> torch.Tensor:
        return batch["window"]

    def pipeline_loss(self, output: torch.Tensor, batch: dict, split: str) -> torch.Tensor:
        everything = torch.ones(len(output), dtype=torch.bool, device=output.device)
        learn = batch.get("learn") if split == "train" else None
        learned, scored = (everything, everything) if learn is None else (learn, ~learn)
        squared = (output - batch["target"]) ** 2
        # the mean over the windows learned from; a batch (or micro-batch) with none trains on nothing
        loss = (squared * learned.unsqueeze(1)).sum() / learned.sum().clamp(min=1) / squared.shape[1]
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(output))
        if not scored.any():
            return loss
        target = self.in_units(batch["target"][scored])
        forecasts = {name: self.in_units(self._baseline(batch, name)[scored]) for name in self.baseline_names}
        if split == "train" and self.served is not None:
            output = self.served.forward(self, _rows(batch, scored))
        else:
            output = output[scored].detach()
        prediction, size = self.in_units(output), int(scored.sum())
        if split == "train":
            self._log_running(prediction, forecasts, target, size)
            return loss
        self.metrics[split](prediction, target)
        self.log_dict(self.metrics[split], batch_size=size, prog_bar=split == "val")
        for name, forecast in forecasts.items():
            metrics = self.baseline_metrics[f"{split}_{name}"]
            metrics(forecast, target)
            self.log_dict(metrics, batch_size=size)
        return loss

    def pipelined_step(self, batch: dict, split: str) -> torch.Tensor:
        if split != "train" and self.served is not None:  # validation and test forecast with the average alone
            return self.pipeline_loss(self.served.forward(self, batch), batch, split)
        return super().pipelined_step(batch, split)

    @staticmethod
    def _baseline(batch: dict, name: str) -> torch.Tensor:
        """A baseline's forecasts (scaled, one column per value ahead): persistence repeats the last reading."""
        if name == "persistence":
            return batch["last"].unsqueeze(1).expand_as(batch["target"])
        return batch[f"baseline_{name}"]

    # --- units and running errors ----------------------------------------------------------
    @property
    def dashboard_units(self) -> dict[str, str]:
        """Axis labels of the training dashboard: the loss is on the scaled target, the errors in its units."""
        return {"loss": "MSE, scaled target", "train/running_rmse": self.hparams.target_unit or "target units"}

    def in_units(self, scaled: torch.Tensor) -> torch.Tensor:
        """Undo the datamodule's scaling of the target (and its log1p, if it took one)."""
        value = scaled * self.hparams.target_std + self.hparams.target_mean
        return torch.expm1(value) if self.hparams.log_target else value

    @property
    def running_rmse_persistence(self) -> MeanSquaredError:
        return self.running_rmse_baselines["persistence"]

    def _running(self) -> dict[str, MeanSquaredError]:
        """The running errors by the name they are logged under (``running_rmse``, ``running_rmse_<baseline>``)."""
        named = {f"running_rmse_{name}": metric for name, metric in self.running_rmse_baselines.items()}
        return {"running_rmse": self.running_rmse, **named}

    def on_fit_start(self) -> None:
        for metric in self._running().values():
            metric.reset()
        if self.served is not None:
            strategy = declared(self.trainer.strategy)
            if not strategy.is_synchronous or strategy.batch_sharing_processes > 1:
                raise UserError(
                    "--ema-decay serves the moving average of the whole model, which needs a synchronous "
                    "strategy holding the whole model in every process (single, mpi, ddp); give --ema-decay 0"
                )
            self.served.start(self)

    # --- the served average (``served_average``) -------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.served is not None and self.trainer.global_step != self._averaged_at_step:
            self._averaged_at_step = self.trainer.global_step  # once per optimizer step
            self.served.update(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.served is not None:
            self.served.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.served is not None:
            self.served.load(checkpoint)

    def _log_running(self, prediction, forecasts: dict, target, size: int) -> None:
        # the forward pass of a training step runs before its optimizer step: a forecast, not a fit
        self.running_rmse.update(prediction, target)
        for name, forecast in forecasts.items():
            self.running_rmse_baselines[name].update(forecast, target)
        # this rank's own running errors, from the metrics' state: compute() would gather every rank's
        # (a collective per step, and the same curve for every rank); test/running_* gather them
        for name, metric in self._running().items():
            own = (metric.sum_squared_error / metric.total).sqrt()
            self.log(f"train/{name}", own, on_step=True, on_epoch=False, batch_size=size)

    def on_test_epoch_end(self) -> None:
        if self.hparams.prequential and self.running_rmse.update_count > 0:
            for name, metric in self._running().items():
                self.log(f"test/{name}", metric.compute())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _rows(batch: dict, keep: torch.Tensor) -> dict:
    """The batch's windows marked in ``keep``: every per-window tensor cut down to them."""
    return {
        key: value[keep] if torch.is_tensor(value) and value.dim() and len(value) == len(keep) else value
        for key, value in batch.items()
    }
