"""Two-layer GCN (Kipf & Welling, ICLR 2017) for node classification on one full graph.

Features may be a sparse CSR matrix (Cora's bag of words is 98.7% zeros): the first layer's
product and the input dropout then touch only the non-zeros. The whole graph goes through the
network at every step; the loss covers only the batch's nodes
(``batch.node_index``), so data parallelism shards the labelled nodes, not the graph.
Reference: 81.5% test accuracy on Cora's public split (Kipf & Welling; PyG's examples/gcn.py).
Our worked example trains it with RMSprop and cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch_geometric.nn import GCNConv
from torchmetrics.classification import MulticlassAccuracy

from lightning_xd.launch.registry import MODELS


def feature_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that keeps sparse (CSR) features sparse: zeros stay zero either way."""
    if not x.is_sparse_csr:
        return F.dropout(x, p, training)
    if not training or p == 0:
        return x
    values = F.dropout(x.values(), p, True)
    return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, x.shape, check_invariants=False)


@MODELS.register("gcn", data="cora", max_epochs=200)
class GCN(LightningModule):
    dashboard_units = {"loss": "cross-entropy, nats"}  # axis labels of the training dashboard

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden_channels: int = 16,
        dropout: float = 0.5,
        lr: float = 0.01,
        weight_decay: float = 5e-4,
    ):
        super().__init__()
        self.save_hyperparameters()
        # cached: the normalised adjacency of the one graph is computed once, not at every step
        self.conv1 = GCNConv(num_features, hidden_channels, cached=True)
        self.conv2 = GCNConv(hidden_channels, num_classes, cached=True)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        x = feature_dropout(x, self.hparams.dropout, self.training)
        x = F.relu(self.conv1(x, edge_index))
        x = F.dropout(x, self.hparams.dropout, self.training)
        return self.conv2(x, edge_index)

    def _logits_and_loss(self, batch):
        logits = self(batch.x, batch.edge_index)[batch.node_index]
        target = batch.y[batch.node_index]
        return logits, target, F.cross_entropy(logits, target)

    def training_step(self, batch, batch_idx):
        _, _, loss = self._logits_and_loss(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch.node_index.numel())
        return loss

    def validation_step(self, batch, batch_idx):
        logits, target, loss = self._logits_and_loss(batch)
        self.val_acc(logits, target)
        self.log("val/loss", loss, sync_dist=True, batch_size=target.numel())
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=target.numel())

    def test_step(self, batch, batch_idx):
        logits, target, loss = self._logits_and_loss(batch)
        self.test_acc(logits, target)
        self.log("test/loss", loss, sync_dist=True, batch_size=target.numel())
        self.log("test/acc", self.test_acc, batch_size=target.numel())

    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
