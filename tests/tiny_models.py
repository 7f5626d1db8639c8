"""A small model and dataset for exact strategy-equivalence tests.

The model mixes a dense MLP with a sparse embedding (``nn.Embedding(sparse=True)``), so one run
checks both gradient paths of a strategy. Plain SGD handles sparse gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanAbsoluteError

from lightning_xd.data import eval_sampler

NUM_IDS = 10


def make_data(n: int, seed: int, with_index: bool = False) -> TensorDataset:
    """(x, ids, y[, index]): ``index`` names each sample, to check which ones were trained on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    ids = torch.randint(0, NUM_IDS, (n,), generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * ids).unsqueeze(1)
    return TensorDataset(x, ids, y, torch.arange(n)) if with_index else TensorDataset(x, ids, y)


class TinyRegressor(LightningModule):
    def __init__(self, lr: float = 0.1):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(NUM_IDS, 2, sparse=True)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.val_mae = MeanAbsoluteError()
        self.lr = lr
        self.sparse_grad_seen: list[bool] = []

    def forward(self, x, ids):
        return self.net(torch.cat([x, self.embedding(ids)], dim=1))

    def loss(self, batch):
        x, ids, y = batch[:3]
        return F.mse_loss(self(x, ids), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def on_before_optimizer_step(self, optimizer):
        self.sparse_grad_seen.append(bool(self.embedding.weight.grad.is_sparse))

    def validation_step(self, batch, batch_idx):
        x, ids, y = batch[:3]
        self.val_mae(self(x, ids), y)
        self.log("val/mae", self.val_mae, batch_size=len(y))
        self.log(
            "val/loss_sum",
            F.mse_loss(self(x, ids), y, reduction="sum"),
            reduce_fx="sum",
            sync_dist=True,
            batch_size=len(y),
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def on_plateau(model_class: type[LightningModule], monitor: str) -> type[LightningModule]:
    """``model_class`` whose optimizer a ReduceLROnPlateau on ``monitor`` schedules (it needs validation
    during training)."""

    class OnPlateau(model_class):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": monitor}}

    OnPlateau.__name__ = OnPlateau.__qualname__ = f"{model_class.__name__}OnPlateau"
    return OnPlateau


class TinyData(LightningDataModule):
    def __init__(self, batch_size: int = 4, n_train: int = 32, n_val: int = 11, with_index: bool = False):
        super().__init__()
        self.batch_size = batch_size
        self.train_set, self.val_set = make_data(n_train, 1, with_index), make_data(n_val, 2, with_index)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=3, sampler=eval_sampler(self.val_set, self.trainer))


class _Block(nn.Module):
    def __init__(self, inputs: int, outputs: int, last: bool = False):
        super().__init__()
        self.linear, self.last = nn.Linear(inputs, outputs), last

    def forward(self, h, batch):
        h = self.linear(h)
        return h if self.last else torch.tanh(h)


class TinyPipelined(LightningModule):
    """Five stages of an MLP, written to the pipeline contract (stages, input, loss)."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        torch.manual_seed(0)
        self.stages = nn.ModuleList(
            [_Block(4, 10), _Block(10, 4), _Block(4, 10), _Block(10, 4), _Block(4, 1, last=True)]
        )
        self.val_mae = MeanAbsoluteError()
        self.lr = lr

    def pipeline_blocks(self):
        return list(self.stages)

    def pipeline_input(self, batch):
        return batch[0]

    def pipeline_loss(self, output, batch, stage):
        y = batch[2]
        loss = F.mse_loss(output, y)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(y))
        if stage == "val":
            self.val_mae(output, y)
            self.log("val/mae", self.val_mae, batch_size=len(y))
        return loss

    def forward(self, x):
        h = x
        for stage in self.stages:
            h = stage(h, None)
        return h

    def training_step(self, batch, batch_idx):
        return self.pipeline_loss(self(batch[0]), batch, "train")

    def validation_step(self, batch, batch_idx):
        self.pipeline_loss(self(batch[0]), batch, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
