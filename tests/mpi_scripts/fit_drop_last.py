"""Lightning's BoringModel with a training loader that drops its last incomplete batch, under each named
strategy in turn: validation must still run at every epoch end, so monitored checkpoints and early
stopping work.   usage: fit_drop_last.py --out DIR --strategies NAME [NAME ...]"""

import argparse
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.launch.registry import STRATEGIES


class DropLast(BoringModel):
    def train_dataloader(self):
        return DataLoader(RandomDataset(32, 70), batch_size=8, drop_last=True)

    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("val_loss", loss, sync_dist=True)
        return loss


class CountEpochEnds(Callback):
    def __init__(self):
        self.validated, self.trained = 0, 0

    def on_validation_epoch_end(self, trainer, pl_module):
        self.validated += 0 if trainer.sanity_checking else 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.trained += 1


parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--strategies", nargs="+", required=True)
args = parser.parse_args()
out = args.out
for name in args.strategies:
    torch.manual_seed(0)
    counter = CountEpochEnds()
    checkpoint = ModelCheckpoint(dirpath=out / name, monitor="val_loss", save_top_k=1)
    stopping = EarlyStopping(monitor="val_loss", patience=100)
    trainer = Trainer(
        strategy=STRATEGIES.build(name, {}),
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        callbacks=[counter, checkpoint, stopping],
    )
    trainer.fit(DropLast())
    if trainer.is_global_zero:
        (out / f"{name}.json").write_text(
            json.dumps(
                {
                    "trained_epochs": counter.trained,
                    "validated_epochs": counter.validated,
                    "steps": trainer.global_step,
                    "best_model_path": checkpoint.best_model_path,
                    "early_stopping_best": None if stopping.best_score is None else float(stopping.best_score),
                }
            )
        )
if torch.distributed.is_initialized():  # DDP's gloo group, ended before MPI is (its threads would abort the exit)
    torch.distributed.destroy_process_group()
