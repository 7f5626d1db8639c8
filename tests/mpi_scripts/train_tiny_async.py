"""Train TinyRegressor with the async strategy; save what each rank saw.

usage: train_tiny_async.py --out DIR --max-epochs N --staleness S [--straggler RANK:SECONDS] [--ckpt-path CKPT]
Saves rank<r>.pt: final state, the parameters after every step (workers), validation metrics
after training, the server's summary and the initial validation loss.
"""

import argparse
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from tiny_models import TinyData, TinyRegressor

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.callbacks import FaultTolerantCheckpoint, StragglerDelay, parse_straggler
from lightning_xd.fault_tolerance.checkpoints import VerifiedCheckpointIO
from lightning_xd.launch.registry import STRATEGIES

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--max-epochs", type=int, required=True)
parser.add_argument("--staleness", type=int, required=True)
parser.add_argument("--straggler", help="RANK:SECONDS, a worker slowed by SECONDS per batch")
parser.add_argument("--ckpt-path", help="a checkpoint to resume from")
args = parser.parse_args()
out, max_epochs, staleness = args.out, args.max_epochs, args.staleness
straggler, ckpt_path = args.straggler, args.ckpt_path


class RecordSteps(Callback):
    def __init__(self):
        self.snapshots = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


strategy = STRATEGIES.build("async", {"staleness": staleness})
model, data, record = TinyRegressor(), TinyData(), RecordSteps()
callbacks = [record, FaultTolerantCheckpoint(out / "checkpoints")]
callbacks += [StragglerDelay(*parse_straggler(straggler))] if straggler else []
trainer = Trainer(
    strategy=strategy,
    accelerator="cpu",
    max_epochs=max_epochs,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    default_root_dir=str(out),
    callbacks=callbacks,
    log_every_n_steps=1,
    plugins=[VerifiedCheckpointIO()],
)
initial = trainer.validate(model, data, verbose=False)[0]
trainer.fit(model, data, ckpt_path=ckpt_path)
final = trainer.validate(model, data, verbose=False)[0]
out.mkdir(parents=True, exist_ok=True)
torch.save(
    {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "snapshots": record.snapshots,
        "initial": initial,
        "final": final,
        "summary": strategy.summary_metrics(),
        "version": strategy.version,
    },
    out / f"rank{trainer.global_rank}.pt",
)
