"""1D CNN over raw inertial windows (acc + gyro, 6 x 128 samples) for human activity recognition.

Three conv-BN-ReLU blocks with pooling, global average pooling over time and a linear classifier;
Adam, cross-entropy; accuracy and the time each training step takes (p50 and p95 in ms, all
ranks' steps together, as ``test/latency_ms_p50`` / ``test/latency_ms_p95``).
People move, sit and carry the phone differently, so a network normalised with the training
people's statistics is off-centre on a new person. With ``adapt_bn`` (the default) every
evaluation batch is normalised by its own batch-norm statistics (AdaBN, Li et al. 2016), and the
har datamodule makes each evaluation batch one person's windows: the network calibrates to each
person from their unlabelled recording; the statistics kept for training are left untouched.
Which way a network tips between sitting and standing for a person who sits at their standing tilt
depends on its random start, so ``members`` (default 3) such CNNs are trained side by side in one
network (grouped convolutions, each member with its own loss) and their probabilities averaged: a
packed ensemble (Laurent et al. 2023). It scored as one CNN on held-out training users (0.963
against 0.962) but moved less with the seed (0.964 and 0.962 against 0.968 and 0.957), at
1.4-1.8 times the step time.
Reference: 1D CNNs on UCI HAR's raw windows reach ~90-91% test accuracy (all 30 users); our
subset has 10 users, trained on 5 (one training user validates) and tested on 4.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_xd.errors import UserError
from lightning_xd.launch.registry import MODELS


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


def conv_bn_relu(c_in: int, c_out: int, kernel: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
    )


@MODELS.register("cnn1d", data="har", max_epochs=50)
class CNN1D(LightningModule):
    dashboard_units = {"loss": "cross-entropy x members, nats"}  # axis labels of the training dashboard

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 32,
        kernel_size: int = 7,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        adapt_bn: bool = True,
        members: int = 3,
    ):
        super().__init__()
        if members < 1:
            raise UserError(f"--members {members}: a model needs at least one member (1 = a single CNN)")
        self.save_hyperparameters()
        c, k, m = channels * members, kernel_size, members
        # ``members`` CNNs side by side as one network: grouped convolutions keep them apart
        self.features = nn.Sequential(
            conv_bn_relu(in_channels * m, c, k, m),
            nn.MaxPool1d(2),  # 128 -> 64 samples
            conv_bn_relu(c, 2 * c, k, m),
            nn.MaxPool1d(2),  # -> 32
            conv_bn_relu(2 * c, 2 * c, k, m),
            nn.AdaptiveAvgPool1d(1),
        )
        # a 1x1 grouped convolution: each member's own linear classifier
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Conv1d(2 * c, num_classes * m, 1, groups=m))
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # one instance for fit and test: Lightning asks configure_callbacks again for each
        self.latency = TrainStepLatency()

    def member_logits(self, windows: torch.Tensor) -> torch.Tensor:
        """(batch, members, classes): every member's logits for the same windows."""
        members = self.hparams.members
        logits = self.classifier(self.features(windows.repeat(1, members, 1)))
        return logits.view(len(windows), members, -1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Log of the members' mean probability (the logits themselves for one member)."""
        logits = self.member_logits(windows)
        if logits.shape[1] == 1:
            return logits[:, 0]
        return torch.logsumexp(logits.log_softmax(-1), dim=1) - math.log(logits.shape[1])

    def configure_callbacks(self) -> list[Callback]:
        return [self.latency]

    def training_step(self, batch, batch_idx):
        windows, target = batch
        logits = self.member_logits(windows)
        members = logits.shape[1]  # the sum of the members' losses: each learns as if trained alone
        loss = F.cross_entropy(logits.flatten(0, 1), target.repeat_interleave(members)) * members
        self.log("train/loss", loss / members, on_step=False, on_epoch=True, sync_dist=True, batch_size=target.numel())
        return loss

    def _evaluate(self, batch, split: str, accuracy: MulticlassAccuracy) -> None:
        windows, target = batch
        with own_batch_statistics(self) if self.hparams.adapt_bn else nullcontext():
            logits = self(windows)
        accuracy(logits, target)
        self.log(f"{split}/loss", F.cross_entropy(logits, target), sync_dist=True, batch_size=target.numel())
        self.log(f"{split}/acc", accuracy, prog_bar=split == "val", batch_size=target.numel())

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # cosine decay to zero: the last epochs settle instead of jumping between minima of a few users
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
