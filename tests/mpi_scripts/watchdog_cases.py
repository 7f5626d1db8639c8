"""The collective watchdog (``--collective-timeout``), under ``mpirun --with-ft ulfm`` on 2 ranks.

usage: watchdog_cases.py --out DIR --case CASE
- ``long-step``: every step computes for longer than the timeout (a sleep); nothing waits on a
  peer, so the job must finish.
- ``hangs-after-log``: rank 1 stops responding (alive, so MPI reports nothing) inside its third
  training step, right after an on_step ``sync_dist`` log; rank 0 then waits for the step's
  gradients, and the watchdog must end the job within the timeout.
"""

import argparse
import time
from pathlib import Path

from lightning.pytorch import Trainer
from tiny_models import TinyData, TinyRegressor

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.launch.registry import STRATEGIES

TIMEOUT = 2.0
parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--case", choices=["long-step", "hangs-after-log"], required=True)
args = parser.parse_args()
out, case = args.out, args.case


class Slow(TinyRegressor):
    def training_step(self, batch, batch_idx):
        if case == "long-step" and batch_idx == 1:
            time.sleep(1.5 * TIMEOUT)
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, on_step=True, sync_dist=True)
        if case == "hangs-after-log" and batch_idx == 2 and self.global_rank == 1:
            time.sleep(3600)
        return loss


strategy = STRATEGIES.build("mpi", {"fault_tolerance": "ulfm", "collective_timeout": TIMEOUT})
trainer = Trainer(
    strategy=strategy,
    accelerator="cpu",
    max_epochs=1,
    limit_train_batches=4,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
)
trainer.fit(Slow(), TinyData())
out.mkdir(parents=True, exist_ok=True)
(out / f"finished-rank{trainer.global_rank}").write_text(f"{trainer.global_step}\n")
