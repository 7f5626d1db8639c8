"""Unsupervised GraphSAGE node embeddings (Hamilton, Ying and Leskovec, NeurIPS 2017).

A 2-layer SAGEConv encoder over node features, concatenated with a learnable per-node table
(``nn.Embedding(sparse=True)``, Hamilton's "identity features"; ``--embedding-dim 0`` drops it).
SAGEConv is linear in its input, so the first layer over [features, table] is computed as one
SAGEConv over the features plus one (without bias) over the table: the same function, but
autograd no longer computes a gradient for the 1,433 input features of every sampled node.
The encoder is
trained with the unsupervised link loss: a node should score high with a neighbour (or the end of
a short random walk) and low with sampled non-neighbours, pooled from every process (a part's own
negatives all come from one METIS region, which alone teaches little about the rest of the graph).
The table's sparse gradients are optimised by SparseAdam, the dense weights by Adam: two optimizers,
so optimization is manual
(``manual_backward`` runs the strategy's gradient averaging, which keeps sparse gradients sparse).
The table starts small (std ``table_init_std``) and moves slowly (``table_lr``): a free per-node
vector fits the link loss easily and, at default init, crowds out what the features say.

Embedding quality: a logistic-regression probe (scikit-learn) on the frozen embeddings of the
probe's training nodes, its regularisation chosen on the validation nodes, scored on the test
nodes: ``test/micro_f1``, ``test/macro_f1``, ``test/acc`` (``val/micro_f1`` is the best
validation score, so it is optimistic). Runs also log their peak memory per
rank (``test/peak_rss_mb_rank<r>``) and training epochs per second (``test/epochs_per_s``).
Reference: Cora public split, probe accuracy 70.7% for DeepWalk + features and 82.3% for DGI
(Velickovic et al., ICLR 2019); Hamilton et al. report micro-F1 0.465-0.502 for unsupervised
GraphSAGE on PPI.
"""

from __future__ import annotations

import resource
import time
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv
from torchmetrics import Metric

from lightning_xd.launch.registry import MODELS

TRAIN, VAL, TEST = 1, 2, 3  # probe split codes, as the partitioned-graph datamodules write them
INFERENCE_CHUNK = 65_536  # receivers per slice when a whole part is embedded without gradients
PROBE_C = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse regularisation strengths tried on the validation nodes


def input_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout by comparing uniform draws: as F.dropout, and several times cheaper on CPU than its
    Bernoulli draws (used for every dropout of this model: the features, the table, the hidden layer)."""
    if not training or p == 0:
        return x
    return x * (torch.rand_like(x) >= p) / (1 - p)


def sage_layer(conv: SAGEConv, x: Tensor, edge_index: Tensor, receivers: int, chunk: int | None = None) -> Tensor:
    """``conv`` computed for the first ``receivers`` nodes only, from the edges into them; in slices
    of ``chunk`` receivers, so that a whole part's messages never sit in memory at once."""
    if receivers == x.shape[0] and (chunk is None or receivers <= chunk):
        return conv(x, edge_index)
    chunk = chunk or receivers
    outputs = []
    for start in range(0, receivers, chunk):
        end = min(receivers, start + chunk)
        into = edge_index[:, (edge_index[1] >= start) & (edge_index[1] < end)]
        into = torch.stack([into[0], into[1] - start])
        outputs.append(conv((x, x[start:end]), into, size=(x.shape[0], end - start)))
    return torch.cat(outputs)


class LinearProbe(Metric):
    """Collects embeddings, labels and probe splits of scored nodes (from every rank, on compute)
    and returns the test scores of a logistic regression fitted on the training nodes."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("splits", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor, splits: Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(labels.detach())
        self.splits.append(splits.detach())

    def compute(self) -> dict[str, Tensor]:
        """Gathered over ranks by torchmetrics' sync (the strategy supplies the collective)."""
        cat = lambda state: torch.cat(state) if isinstance(state, list) else state  # noqa: E731
        z, y, split = cat(self.embeddings).numpy(), cat(self.labels).numpy(), cat(self.splits).numpy()
        scores = probe_scores(
            z[split == TRAIN], y[split == TRAIN], z[split == VAL], y[split == VAL], z[split == TEST], y[split == TEST]
        )
        return {name: torch.tensor(value) for name, value in scores.items()}


def probe_scores(z_train, y_train, z_val, y_val, z_test, y_test) -> dict[str, float]:
    """Logistic regression on standardised embeddings; C picked by validation micro-F1."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(z_train)
    z_train, z_val, z_test = scaler.transform(z_train), scaler.transform(z_val), scaler.transform(z_test)
    multilabel = y_train.ndim == 2

    def fit(c: float):
        probe = LogisticRegression(C=c, max_iter=1000)
        return (OneVsRestClassifier(probe) if multilabel else probe).fit(z_train, y_train)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (ConvergenceWarning, UserWarning))
        val_f1 = {c: f1_score(y_val, fit(c).predict(z_val), average="micro") for c in PROBE_C}
        best = max(PROBE_C, key=val_f1.get)
        predicted = fit(best).predict(z_test)
    return {
        "val_micro_f1": val_f1[best],
        "micro_f1": f1_score(y_test, predicted, average="micro"),
        "macro_f1": f1_score(y_test, predicted, average="macro", zero_division=0),
        "acc": accuracy_score(y_test, predicted),
        "probe_c": best,
    }


class ResourceUsage(Callback):
    """Training epochs per second (time in training batches, so a partial epoch counts as its
    fraction and validation is left out) and each rank's peak resident memory, logged at test time."""

    def __init__(self):
        self.batches, self.seconds = 0, 0.0
        self.batches_per_epoch = 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()
        self.batches_per_epoch = max(1, int(trainer.num_training_batches))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self.seconds += time.perf_counter() - self._started

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        per_rank = pl_module.all_gather(torch.tensor(peak_mb)).view(-1)
        for rank, value in enumerate(per_rank.tolist()):
            pl_module.log(f"test/peak_rss_mb_rank{rank}", value, sync_dist=True, batch_size=1)
        if self.batches:
            rate = torch.tensor(self.batches / self.batches_per_epoch / self.seconds)
            slowest = trainer.strategy.reduce(rate, reduce_op="min")  # ranks step together: the slowest sets it
            pl_module.log("test/epochs_per_s", slowest, sync_dist=True, batch_size=1)


@MODELS.register("graphsage", data="cora-graph", trains_on=("cora-graph", "ppi", "synthetic-graph"), max_epochs=10)
class GraphSAGE(LightningModule):
    dashboard_units = {"loss": "link loss, nats"}  # axis labels of the training dashboard

    def __init__(
        self,
        num_features: int,
        num_nodes: int,
        hidden_channels: int = 256,
        out_channels: int = 64,
        embedding_dim: int = 64,
        dropout: float = 0.5,
        lr: float = 0.003,
        table_lr: float = 1e-4,
        table_init_std: float = 0.01,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # Adam for the dense weights, SparseAdam for the table
        self.table = nn.Embedding(num_nodes, embedding_dim, sparse=True) if embedding_dim > 0 else None
        if self.table is not None:
            nn.init.normal_(self.table.weight, std=table_init_std)
        self.conv1 = SAGEConv(num_features, hidden_channels)
        self.table_conv1 = SAGEConv(embedding_dim, hidden_channels, bias=False) if embedding_dim > 0 else None
        self.conv2 = SAGEConv(hidden_channels, out_channels)
        self.val_probe, self.test_probe = LinearProbe(), LinearProbe()
        # one instance for fit and test: the test run reads the epoch times the fit run measured
        self.resource_usage = ResourceUsage()

    def forward(self, x: Tensor, node_ids: Tensor, edge_index: Tensor, hop_nodes: list | None = None) -> Tensor:
        """Embeddings of the first ``hop_nodes[0]`` nodes of a sampled subgraph (every node without
        ``hop_nodes``). Layer 1 is computed only for nodes within one hop of the targets, layer 2
        only for the targets: the farther nodes are inputs, never outputs."""
        receivers = [x.shape[0]] * 2 if hop_nodes is None else [hop_nodes[0] + hop_nodes[1], hop_nodes[0]]
        chunk = None if torch.is_grad_enabled() else INFERENCE_CHUNK
        x = input_dropout(x, self.hparams.dropout, self.training)
        h = sage_layer(self.conv1, x, edge_index, receivers[0], chunk)
        if self.table is not None:
            table = input_dropout(self.table(node_ids), self.hparams.dropout, self.training)  # as the features
            h = h + sage_layer(self.table_conv1, table, edge_index, receivers[0], chunk)
        h = input_dropout(F.relu(h), self.hparams.dropout, self.training)
        return sage_layer(self.conv2, h, edge_index, receivers[1], chunk)

    def embed(self, batch) -> Tensor:
        """Embeddings of a training batch's target nodes (its sampled subgraph's first nodes)."""
        return self(batch.x, batch.n_id, batch.edge_index, batch.hop_nodes)

    def link_loss(self, z: Tensor, batch, negatives: Tensor) -> Tensor:
        """Hamilton's loss: -log s(z_u . z_v) for positive pairs (u, v), -log s(-z_u . z_w) for every
        seed u against every embedding w in ``negatives``."""
        seeds = z[batch.pos_pairs[0]]
        positive = (seeds * z[batch.pos_pairs[1]]).sum(-1)
        negative = seeds @ negatives.t()
        return F.binary_cross_entropy_with_logits(
            positive, torch.ones_like(positive)
        ) + F.binary_cross_entropy_with_logits(negative, torch.zeros_like(negative))

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        z = self.embed(batch)
        # Each process samples negatives from its own part of the graph, which METIS made a region of
        # similar nodes; contrasting with the negatives of every process keeps them graph-wide
        # (gradients flow back to whichever process embedded them).
        negatives = self.all_gather(z[batch.neg_pairs[1]], sync_grads=True).reshape(-1, z.shape[1])
        loss = self.link_loss(z, batch, negatives)
        self.manual_backward(loss)  # the strategy averages gradients here
        for optimizer in optimizers:
            optimizer.step()
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch.batch_size)
        return loss

    def _embed_for_probe(self, batch, probe: LinearProbe) -> None:
        z = self(batch.x, batch.n_id, batch.edge_index)[batch.targets]
        probe.update(z, batch.y, batch.split)

    def validation_step(self, batch, batch_idx):
        self._embed_for_probe(batch, self.val_probe)

    def test_step(self, batch, batch_idx):
        self._embed_for_probe(batch, self.test_probe)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_probe.compute()
        self.log("val/micro_f1", scores["val_micro_f1"].float(), prog_bar=True, sync_dist=True, batch_size=1)
        self.val_probe.reset()

    def on_test_epoch_end(self) -> None:
        scores = self.test_probe.compute()
        for name in ("micro_f1", "macro_f1", "acc", "probe_c"):
            self.log(f"test/{name}", scores[name].float(), sync_dist=True, batch_size=1)
        self.test_probe.reset()

    def configure_callbacks(self):
        return [self.resource_usage]

    def configure_optimizers(self):
        dense = [p for name, p in self.named_parameters() if not name.startswith("table.")]
        optimizers = [torch.optim.Adam(dense, lr=self.hparams.lr)]
        if self.table is not None:
            optimizers.append(torch.optim.SparseAdam(list(self.table.parameters()), lr=self.hparams.table_lr))
        return optimizers
