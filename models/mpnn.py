"""Message passing neural network for molecular properties: edge network (NNConv) + GRU updates +
Set2Set readout, the enn-s2s model of Gilmer et al., "Neural Message Passing for Quantum
Chemistry", ICML 2017 (PyG: examples/qm9_nn_conv.py). Adam, L1 loss on the standardised target.

Speed: NNConv turns every edge's features into a d x d matrix (d*d = 4,096 numbers per edge, over
300 edges per molecule) and multiplies it with the sender's state. That matrix is linear in the
edge network's hidden layer g, so the sum over senders j of h_j W(e_ij) equals
(sum_j g_ij (x) h_j) @ W: one batched product over the molecules padded to a dense block, then
one matrix product per node. Same numbers as PyG's NNConv (a test checks it), without the d x d
matrix per edge; the cost is linear in the edge network's width, which is 16 by default.
Distances enter through 50 Gaussian radial basis functions.

Readout: Set2Set pooling and a two-layer head. For the dipole moment (``--target mu``, the
default, ``--readout auto``) a physical term is added: per-atom charges that sum to zero in each
molecule, mu = |sum_i q_i r_i|; Set2Set learns what point charges miss (``--readout set2set``
drops the term). Measured on 2,400 molecules in 20 epochs: Set2Set alone 0.61 D validation MAE
(2x better than the mean), with the charge term 0.34 D (3.5x).

Pipeline contract (``lightning_xd.models.pipelined``): one block per message-passing step (4 by default), the
embedding joined to the first and readout + head to the last (the steps hold nearly all parameters);
each block is ``block(h, batch)``, the graph structure travels in ``batch`` beside the node states ``h``.
Reference: Gilmer et al., mu MAE 0.030 D with 110k training molecules; here, 2,400 molecules and
the bar is the MAE of predicting the training mean (``test/mae_mean_predictor``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import Set2Set
from torch_geometric.utils import scatter
from torchmetrics import MeanAbsoluteError

from lightning_xd.errors import UserError
from lightning_xd.launch.registry import MODELS
from lightning_xd.models.pipelined import Block, PipelinedModule


class GaussianDistances(nn.Module):
    """A distance (Å) as the values of Gaussians centred on a grid from 0 to ``cutoff``."""

    def __init__(self, num_gaussians: int = 50, cutoff: float = 10.0):
        super().__init__()
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_gaussians))
        self.gamma = 0.5 / float(self.centres[1] - self.centres[0]) ** 2

    def forward(self, distance: Tensor) -> Tensor:
        # in place: distances are data (no gradient), and this runs on every edge at every step
        return (distance.view(-1, 1) - self.centres).square_().mul_(-self.gamma).exp_()


def dense_positions(node_molecule: Tensor, molecules: int) -> tuple[Tensor, int]:
    """Each node's row in the molecules-by-atoms block (molecule * n_max + index in molecule), and n_max."""
    counts = torch.bincount(node_molecule, minlength=molecules)
    n_max = int(counts.max())
    first_node = torch.cumsum(counts, 0) - counts
    local = torch.arange(node_molecule.numel(), device=counts.device) - first_node[node_molecule]
    return node_molecule * n_max + local, n_max


class EdgeConditionedConv(nn.Module):
    """PyG's ``NNConv(d, d, edge_network, aggr="mean")``, computed as dense batched products.

    The edge network is Linear(features, hidden) -> ReLU -> Linear(hidden, d*d), so
    W(e) = sum_k g_k(e) A_k + B with g the hidden layer. Instead of building W(e) per edge we
    gather sum_j [g(e_ij), 1] (x) h_j per receiver (one bmm per batch) and multiply once by [A; B].
    """

    def __init__(self, channels: int, edge_features: int, edge_hidden: int = 128):
        super().__init__()
        self.channels = channels
        self.edge_hidden = nn.Sequential(nn.Linear(edge_features, edge_hidden), nn.ReLU())
        self.edge_weight = nn.Linear(edge_hidden, channels * channels)  # the edge network's last layer
        self.root = nn.Linear(channels, channels)  # NNConv's root weight and bias

    def message_weights(self) -> Tensor:
        """[A_1; ...; A_k; B] as one ((hidden + 1) * d_in, d_out) matrix."""
        d = self.channels
        per_channel = self.edge_weight.weight.t().reshape(-1, d, d)  # (hidden, d_in, d_out)
        return torch.cat([per_channel, self.edge_weight.bias.view(1, d, d)]).reshape(-1, d)

    def forward(
        self, h: Tensor, edge_index: Tensor, edge_features: Tensor, node_molecule: Tensor, molecules: int
    ) -> Tensor:
        sender, receiver = edge_index
        rows, n_max = dense_positions(node_molecule, molecules)
        g = self.edge_hidden(edge_features)
        g = torch.cat([g, torch.ones_like(g[:, :1])], dim=1)  # the constant channel carries B
        channels = g.shape[1]
        # block[m * n_max + i, c, j] = g_c(edge j -> i): the molecule's edges as a dense block
        block = h.new_zeros(molecules * n_max, channels, n_max)
        block[rows[receiver], :, rows[sender] % n_max] = g
        h_dense = h.new_zeros(molecules * n_max, self.channels)
        h_dense[rows] = h
        gathered = torch.bmm(block.view(molecules, n_max * channels, n_max), h_dense.view(molecules, n_max, -1))
        summed = gathered.view(molecules * n_max, -1)[rows] @ self.message_weights()
        in_degree = torch.bincount(receiver, minlength=h.shape[0]).clamp(min=1).unsqueeze(1)
        return summed / in_degree + self.root(h)


class Embedding(nn.Module):
    def __init__(self, num_features: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(num_features, channels)

    def forward(self, x: Tensor, batch) -> Tensor:
        return F.relu(self.linear(x))


class MessagePassingStep(nn.Module):
    """One step: messages through the edge network, then a GRU update of every atom's state."""

    def __init__(self, channels: int, distances: GaussianDistances, edge_hidden: int):
        super().__init__()
        self.distances = distances
        self.conv = EdgeConditionedConv(channels, distances.centres.numel(), edge_hidden)
        self.gru = nn.GRUCell(channels, channels)

    def forward(self, h: Tensor, batch) -> Tensor:
        messages = self.conv(h, batch.edge_index, self.distances(batch.edge_attr), batch.batch, batch.num_graphs)
        return self.gru(F.relu(messages), h)


class Set2SetReadout(nn.Module):
    """Set2Set pooling of the atoms' states, then a two-layer head: one standardised value per molecule."""

    def __init__(self, channels: int):
        super().__init__()
        self.pool = Set2Set(channels, processing_steps=3)
        self.head = nn.Sequential(nn.Linear(2 * channels, channels), nn.ReLU(), nn.Linear(channels, 1))

    def forward(self, h: Tensor, batch) -> Tensor:
        return self.head(self.pool(h, batch.batch, dim_size=batch.num_graphs)).view(-1)


class DipoleReadout(nn.Module):
    """mu = |sum_i q_i r_i| with per-atom charges q_i shifted to sum to zero in each molecule, so the
    dipole does not depend on where the origin is; returned standardised like the target."""

    def __init__(self, channels: int, target_mean: float, target_std: float):
        super().__init__()
        self.charge = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, 1))
        self.target_mean, self.target_std = target_mean, target_std

    def forward(self, h: Tensor, batch) -> Tensor:
        q = self.charge(h).view(-1)
        q = q - scatter(q, batch.batch, dim=0, dim_size=batch.num_graphs, reduce="mean")[batch.batch]
        dipole = scatter(q.unsqueeze(1) * batch.pos, batch.batch, dim=0, dim_size=batch.num_graphs, reduce="sum")
        mu = torch.sqrt((dipole**2).sum(dim=1) + 1e-8)  # eps: a finite gradient at mu = 0
        return (mu - self.target_mean) / self.target_std


class SummedReadouts(nn.Module):
    """The dipole of learnt charges plus a Set2Set correction (what point charges miss)."""

    def __init__(self, *readouts: nn.Module):
        super().__init__()
        self.readouts = nn.ModuleList(readouts)

    def forward(self, h: Tensor, batch) -> Tensor:
        return sum(readout(h, batch) for readout in self.readouts)


def build_readout(readout: str, target: str, channels: int, target_mean: float, target_std: float) -> nn.Module:
    if readout == "auto":  # the physical readout where the target is the dipole moment
        readout = "set2set+dipole" if target == "mu" else "set2set"
    parts = readout.split("+")
    if not parts or set(parts) - {"set2set", "dipole"} or ("dipole" in parts and target != "mu"):
        raise UserError(
            f"--readout {readout!r}: choose auto, set2set, dipole or set2set+dipole (dipole only "
            f"for --target mu, not {target})"
        )
    built = [
        Set2SetReadout(channels) if part == "set2set" else DipoleReadout(channels, target_mean, target_std)
        for part in parts
    ]
    return built[0] if len(built) == 1 else SummedReadouts(*built)


@MODELS.register("mpnn", data="qm9", max_epochs=30)
class MPNN(PipelinedModule):
    dashboard_units = {"loss": "L1, in target std"}  # axis labels of the training dashboard

    def __init__(
        self,
        num_features: int,
        target: str = "mu",
        target_mean: float = 0.0,
        target_std: float = 1.0,
        hidden_channels: int = 64,
        edge_hidden: int = 16,
        steps: int = 4,
        num_gaussians: int = 50,
        cutoff: float = 10.0,
        readout: str = "auto",
        lr: float = 2e-3,
    ):
        super().__init__()
        self.save_hyperparameters()
        distances = GaussianDistances(num_gaussians, cutoff)
        self.embedding = Embedding(num_features, hidden_channels)
        self.steps = nn.ModuleList(MessagePassingStep(hidden_channels, distances, edge_hidden) for _ in range(steps))
        self.readout = build_readout(readout, target, hidden_channels, target_mean, target_std)
        self.train_mae, self.val_mae, self.test_mae = MeanAbsoluteError(), MeanAbsoluteError(), MeanAbsoluteError()
        self.mean_predictor_mae = MeanAbsoluteError()

    def pipeline_blocks(self) -> list[nn.Module]:
        """Built afresh around the model's own layers: the model's state dict stays that of its layers."""
        blocks = [Block(step) for step in self.steps]
        blocks[0].layers.insert(0, self.embedding)
        blocks[-1].layers.append(self.readout)
        return blocks

    def pipeline_input(self, batch) -> Tensor:
        return batch.x

    def pipeline_loss(self, output: Tensor, batch, split: str) -> Tensor:
        mean, std = self.hparams.target_mean, self.hparams.target_std
        loss = F.l1_loss(output, (batch.target - mean) / std)
        size = batch.num_graphs
        mae = getattr(self, f"{split}_mae")
        mae(output * std + mean, batch.target)  # in the target's own units
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        self.log(f"{split}/mae", mae, on_step=False, on_epoch=True, prog_bar=split == "val", batch_size=size)
        if split == "test":
            self.mean_predictor_mae(torch.full_like(batch.target, mean), batch.target)
            self.log("test/mae_mean_predictor", self.mean_predictor_mae, batch_size=size)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        # one cycle: warm up to lr, then anneal to ~0 by the last step (a fixed budget of epochs)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=max(1, self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
