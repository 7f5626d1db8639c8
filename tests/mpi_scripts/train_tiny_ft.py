"""TinyRegressor through the real fault-tolerance path: mpi strategy, fault-tolerant checkpoints,
fault injection; every rank appends, at each optimizer step, the sample indices whose gradients
that step applies.

usage: train_tiny_ft.py --out DIR --epochs N [--fault SPEC] [--set KEY=VALUE ...]
KEY=VALUE settings: strategy=mpi, every=2 (checkpoint every N steps), batchnorm=1 (a BatchNorm layer: its
buffers are broadcast before every step), log=1 (an on_step sync_dist log inside training_step),
accumulate=A (accumulate_grad_batches), dashboard=1 (the run's events and dashboard: ``dashboard.png`` and
TensorBoard logs in OUT, every rank's series in result.pt), straggler=RANK:SECONDS (as --straggler-delay).
"""

import argparse
import json
import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tiny_models import TinyData, TinyRegressor
from torch import nn

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.callbacks import (
    FaultInjector,
    FaultTolerantCheckpoint,
    RunEvents,
    StragglerDelay,
    parse_fault,
    parse_straggler,
)
from lightning_xd.contract import declared
from lightning_xd.fault_tolerance.checkpoints import VerifiedCheckpointIO
from lightning_xd.launch.registry import STRATEGIES
from lightning_xd.launch.runner import choose_checkpoint
from lightning_xd.mpi_strategy import MPIStrategy
from lightning_xd.viz import TrainingDashboard

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--epochs", type=int, required=True)
parser.add_argument("--fault", help="what to inject, as lightning_xd.callbacks.parse_fault reads it")
parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="settings")
args = parser.parse_args()
out, epochs, fault = args.out, args.epochs, args.fault
settings = dict(arg.split("=") for arg in args.settings)


class Recording(TinyRegressor):
    """Remembers the samples of every training step since the last optimizer step, each with the number
    of recoveries so far: a window interrupted by a failure is trained again on other batches, and
    only what a step applies is counted."""

    def __init__(self):
        super().__init__(lr=0.05)
        self.norm = nn.BatchNorm1d(6) if settings.get("batchnorm") == "1" else nn.Identity()
        self.window: list[tuple[int, list[int]]] = []

    def forward(self, x, ids):
        return self.net(self.norm(torch.cat([x, self.embedding(ids)], dim=1)))

    def training_step(self, batch, batch_idx):
        # counted by the recoveries before this batch's step began: a failure later in the step (in the
        # log below, say) means its gradients are dropped and its samples trained again elsewhere
        self.window.append((len(self.trainer.strategy.recoveries()), batch[3].tolist()))
        loss = super().training_step(batch, batch_idx)
        if settings.get("log") == "1":
            self.log("train/loss", loss, on_step=True, on_epoch=False, sync_dist=True)
        return loss


class RecordSamples(Callback):
    """One line per optimizer step: epoch, step, world size, the samples this rank's gradients held."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        recoveries = len(trainer.strategy.recoveries())
        applied = [i for seen_after, indices in pl_module.window if seen_after == recoveries for i in indices]
        pl_module.window = []
        with open(out / f"samples-{os.getpid()}.jsonl", "a") as f:
            f.write(
                json.dumps(
                    {
                        "epoch": trainer.current_epoch,
                        "step": trainer.global_step + 1,
                        "world": trainer.world_size,
                        "index": applied,
                    }
                )
                + "\n"
            )


strategy = STRATEGIES.build(settings.get("strategy", "mpi"), {})
model = Recording()
callbacks = [RecordSamples(), FaultTolerantCheckpoint(out / "checkpoints", every_n_steps=int(settings.get("every", 2)))]
if fault:
    callbacks.append(FaultInjector(parse_fault(fault)))
if "straggler" in settings:
    callbacks.append(StragglerDelay(*parse_straggler(settings["straggler"])))
dashboard = None
if settings.get("dashboard") == "1":
    events = RunEvents(out)
    dashboard = TrainingDashboard(out, every_n_steps=0, events=events)
    callbacks += [events, dashboard]
out.mkdir(parents=True, exist_ok=True)
resume = choose_checkpoint("auto", out) if strategy.global_rank == 0 else None
resume = strategy.comm.broadcast_object(resume) if isinstance(strategy, MPIStrategy) else resume
trainer = Trainer(
    strategy=strategy,
    accelerator="cpu",
    max_epochs=epochs,
    logger=TensorBoardLogger(out, name="tensorboard") if dashboard is not None else False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    callbacks=callbacks,
    accumulate_grad_batches=int(settings.get("accumulate", 1)),
    plugins=[VerifiedCheckpointIO()],
    default_root_dir=str(out),
)
trainer.fit(model, TinyData(batch_size=2, n_train=36, with_index=True), ckpt_path=resume)
final = trainer.validate(model, TinyData(batch_size=2, n_train=36, with_index=True), verbose=False)[0]
series = dashboard.state_dict()["series"] if dashboard is not None else None  # every rank takes part
if trainer.is_global_zero:
    torch.save(
        {
            "state": model.state_dict(),
            "final": final,
            "steps": trainer.global_step,
            "world": trainer.world_size,
            "summary": strategy.summary_metrics(),
            "dashboard": series,
        },
        out / "result.pt",
    )
    (out / "COMPLETED").write_text("done\n")
if declared(strategy).recoveries():
    from lightning_xd.comm.ulfm import leave_after_failure

    leave_after_failure()  # MPI_Finalize may hang on the lost process
