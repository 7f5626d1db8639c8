"""1D CNN over raw inertial windows (acc + gyro, 6 x 128 samples) for human activity recognition.

Three conv-BN-ReLU blocks with pooling, global average pooling over time and a linear classifier;
Adam, cross-entropy; accuracy and the time each training step takes (p50 and p95 in ms, all
ranks' steps together, as ``test/latency_ms_p50`` / ``test/latency_ms_p95``).
People move, sit and carry the phone differently, so a network normalised with the training
people's statistics is off-centre on a new person. With ``adapt_bn`` (the default) every
evaluation batch is normalised by its own batch-norm statistics (AdaBN, Li et al. 2016), and the
har datamodule makes each evaluation batch one person's windows: the network calibrates to each
person from their unlabelled recording; the statistics kept for training are left untouched.
Reference: 1D CNNs on UCI HAR's raw windows reach ~90-91% test accuracy (all 30 users); our
subset has 10 users, trained on 5 (one training user validates) and tested on 4.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_xd.registry import MODELS


class TrainStepLatency(Callback):
    """Wall-clock time of every training step (forward, backward, gradient exchange, optimizer step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if not self.seconds:  # tested without training
            return
        # every rank runs the same number of steps, so all_gather sees equal lengths
        steps_ms = pl_module.all_gather(torch.tensor(self.seconds, device=pl_module.device) * 1000).flatten()
        for q in (50, 95):
            value = torch.quantile(steps_ms.double(), q / 100).float()
            pl_module.log(f"test/latency_ms_p{q}", value, sync_dist=True)


@contextmanager
def own_batch_statistics(module: nn.Module):
    """Batch-norm layers normalise with the statistics of the batch itself and leave their running ones alone."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [(m.training, m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
    for m in norms:  # without running buffers, a norm in training mode only reads the batch
        m.training, m.running_mean, m.running_var, m.num_batches_tracked = True, None, None, None
    try:
        yield
    finally:
        for m, (training, mean, var, count) in zip(norms, kept):
            m.training, m.running_mean, m.running_var, m.num_batches_tracked = training, mean, var, count


def conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm1d(c_out),
                         nn.ReLU(inplace=True))


@MODELS.register("cnn1d", data="har", max_epochs=50)
class CNN1D(LightningModule):
    def __init__(self, in_channels: int, num_classes: int, channels: int = 32, kernel_size: int = 7,
                 dropout: float = 0.5, lr: float = 1e-3, weight_decay: float = 1e-4, adapt_bn: bool = True):
        super().__init__()
        self.save_hyperparameters()
        c, k = channels, kernel_size
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, c, k), nn.MaxPool1d(2),  # 128 -> 64 samples
            conv_bn_relu(c, 2 * c, k), nn.MaxPool1d(2),  # -> 32
            conv_bn_relu(2 * c, 2 * c, k),
            nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * c, num_classes))
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # one instance for fit and test: Lightning asks configure_callbacks again for each
        self.latency = TrainStepLatency()

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(windows))

    def configure_callbacks(self) -> list[Callback]:
        return [self.latency]

    def training_step(self, batch, batch_idx):
        windows, target = batch
        loss = F.cross_entropy(self(windows), target)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=target.numel())
        return loss

    def _evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy) -> None:
        windows, target = batch
        with own_batch_statistics(self) if self.hparams.adapt_bn else nullcontext():
            logits = self(windows)
        accuracy(logits, target)
        self.log(f"{stage}/loss", F.cross_entropy(logits, target), sync_dist=True, batch_size=target.numel())
        self.log(f"{stage}/acc", accuracy, prog_bar=stage == "val", batch_size=target.numel())

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # cosine decay to zero: the last epochs settle instead of jumping between minima of a few users
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
