"""Train TinyRegressor with a registered strategy on every rank; save each rank's result.

usage: train_tiny.py OUT_DIR STRATEGY [BUCKET_SIZE_MB]
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from tiny_models import TinyData, TinyRegressor

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.launch.registry import STRATEGIES

out, name = Path(sys.argv[1]), sys.argv[2]
settings = {"bucket_size_mb": float(sys.argv[3])} if len(sys.argv) > 3 else {}
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
