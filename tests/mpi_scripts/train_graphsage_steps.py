"""Train GraphSAGE (no dropout) with a registered strategy for K batches of a generated graph
partitioned over the ranks; save each rank's batches, initial and final weights and whether the
table's gradient was sparse after the strategy averaged it.

usage: train_graphsage_steps.py OUT_DIR DATA_DIR STRATEGY STEPS
"""

import argparse
from pathlib import Path

import torch
from lightning.pytorch import Trainer

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.datamodules.synthetic_graph import SyntheticGraphDataModule
from lightning_xd.launch.registry import STRATEGIES
from lightning_xd.models.graphsage import GraphSAGE

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--data-dir", required=True)
parser.add_argument("--strategy", required=True)
parser.add_argument("--steps", type=int, required=True)
args = parser.parse_args()
out, data_dir, name, steps = args.out, args.data_dir, args.strategy, args.steps


class RecordingGraphSAGE(GraphSAGE):
    """Keeps the batches it trained on and the kind of the table's gradient after each backward."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches, self.sparse_grad_seen = [], []

    def manual_backward(self, loss, *args, **kwargs):
        super().manual_backward(loss, *args, **kwargs)  # the strategy averages gradients in here
        self.sparse_grad_seen.append(bool(self.table.weight.grad.is_sparse))

    def training_step(self, batch, batch_idx):
        self.batches.append(batch)
        return super().training_step(batch, batch_idx)


strategy = STRATEGIES.build(name, {})
datamodule = SyntheticGraphDataModule(
    data_dir,
    str(out / "cache"),
    batch_size=16,
    num_nodes=300,
    num_features=8,
    num_communities=3,
    fanouts="4,3",
    nprocs=strategy.world_size,
)
torch.manual_seed(strategy.global_rank)  # different initial weights per rank: the strategy must broadcast
model = RecordingGraphSAGE(
    **datamodule.model_kwargs(),
    hidden_channels=16,
    out_channels=8,
    embedding_dim=4,
    dropout=0.0,
    table_init_std=0.1,
    table_lr=0.01,
)
initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
trainer = Trainer(
    strategy=strategy,
    accelerator="cpu",
    max_epochs=1,
    limit_train_batches=steps,
    limit_val_batches=0,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)
trainer.fit(model, datamodule)
out.mkdir(parents=True, exist_ok=True)
torch.save(
    {
        "initial": initial,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "batches": model.batches,
        "sparse_grad_seen": model.sparse_grad_seen,
        "hparams": dict(model.hparams),
    },
    out / f"rank{trainer.global_rank}.pt",
)
