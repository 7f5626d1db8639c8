"""Models whose gradients arrive differently on different ranks, and the runs that compare the
``mpi`` strategy with one process training on the union of the ranks' batches.

Each sample carries a flag: 1 for the samples rank 1 trains on in the first epoch (Lightning's
shuffling distributed sampler, seed 0), 0 for rank 0's. A model can branch on it and so behave
differently on the two ranks, as a data-dependent model does.

- ``BranchOrder``: two equal-shaped branches evaluated in an order that depends on the batch, so
  backward finishes their gradients in opposite orders on the two ranks.
- ``PartlyUsed``: a branch only rank 1's samples use, and a parameter nothing uses (AdamW with
  weight decay would move it if it were given a zero gradient).
- ``Unfrozen``: a backbone frozen for the first epoch and unfrozen by Lightning's BackboneFinetuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conformance.models import backbone_finetuning
from lightning.pytorch import LightningModule
from reference_training import StepOrder, fit_one_process, in_step_order, state_of
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SAMPLES, BATCH, RANKS = 16, 2, 2  # per rank: 8 samples, 4 steps an epoch


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SAMPLES, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    flag = torch.zeros(SAMPLES, dtype=torch.long)
    flag[StepOrder(SAMPLES, RANKS, BATCH).shards()[1]] = 1  # epoch 0
    return TensorDataset(x, y, flag)


class _Base(LightningModule):
    optimizer = "sgd"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)

    def training_step(self, batch, batch_idx):
        x, y, flag = batch
        return F.mse_loss(self(x, flag), y)

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.5)
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    def train_dataloader(self):  # each rank's; the one-process reference reads in_step_order(dataset(), ...)
        return DataLoader(dataset(), batch_size=BATCH, shuffle=False)


class BranchOrder(_Base):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x, flag):
        if int(flag[0]) == 0:  # the branch evaluated last finishes its gradient first in backward (rank 0)
            h = self.a(x)
            h = h + self.b(x.square())
        else:
            h = self.b(x.square())
            h = self.a(x) + h
        return self.head(torch.tanh(h))


class PartlyUsed(_Base):
    optimizer = "adamw"

    def __init__(self):
        super().__init__()
        self.a, self.only_odd, self.never = nn.Linear(4, 1), nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x, flag):
        out = self.a(x)
        odd = flag == 1
        if bool(odd.any()):
            out = out + odd.unsqueeze(1) * self.only_odd(x)
        return out


class Unfrozen(_Base):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x, flag):
        return self.head(self.backbone(x))


# name: (model class, strategy settings, callbacks, epochs)
CASES = {
    "order": (BranchOrder, {"bucket_size_mb": 1e-6}, list, 1),
    "partly-used": (PartlyUsed, {"bucket_size_mb": 1e-6, "find_unused_parameters": True}, list, 1),
    "partly-used-refused": (PartlyUsed, {"bucket_size_mb": 1e-6}, list, 1),
    "unfrozen": (Unfrozen, {}, lambda: [backbone_finetuning()], 2),
}


def union_reference(case: str) -> dict:
    """The model's parameters after training in one process on the union of both ranks' batches."""
    model_class, _, callbacks, epochs = CASES[case]
    _, model = fit_one_process(model_class, in_step_order(dataset(), RANKS, BATCH), epochs, callbacks())
    return state_of(model)
