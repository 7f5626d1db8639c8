"""Train TinyRegressor with a registered strategy on every rank; save each rank's result.

usage: train_tiny.py --out DIR --strategy NAME [--bucket-size-mb MB]
"""

import argparse
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from tiny_models import TinyData, TinyRegressor

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.launch.registry import STRATEGIES

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--strategy", required=True)
parser.add_argument("--bucket-size-mb", type=float)
args = parser.parse_args()
out, name = args.out, args.strategy
settings = {} if args.bucket_size_mb is None else {"bucket_size_mb": args.bucket_size_mb}
strategy = STRATEGIES.build(name, settings)
model = TinyRegressor()
trainer = Trainer(
    strategy=strategy,
    accelerator="cpu",
    max_epochs=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)
trainer.fit(model, TinyData())
out.mkdir(parents=True, exist_ok=True)
torch.save(
    {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "steps": trainer.global_step,
        "sparse_grad_seen": model.sparse_grad_seen,
    },
    out / f"rank{trainer.global_rank}.pt",
)
