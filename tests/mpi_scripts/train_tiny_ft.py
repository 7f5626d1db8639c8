"""TinyRegressor through the real fault-tolerance path: mpi strategy, fault-tolerant checkpoints,
fault injection; every rank appends the sample indices of each completed step to a file.

usage: train_tiny_ft.py OUT_DIR EPOCHS [FAULT] [EXTRA SETTINGS as key=value ...]
"""
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

import strategies  # noqa: F401  (registers the names)
from lightning_xd.callbacks import FaultInjector, FaultTolerantCheckpoint, parse_fault
from lightning_xd.checkpoints import VerifiedCheckpointIO
from lightning_xd.registry import STRATEGIES
from lightning_xd.runner import choose_checkpoint
from tiny_models import TinyData, TinyRegressor

out, epochs = Path(sys.argv[1]), int(sys.argv[2])
fault = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
settings = dict(arg.split("=") for arg in sys.argv[4:])


class Recording(TinyRegressor):
    """Remembers the samples of its last training step (a step redone after a failure trains on
    other samples than the batch Lightning fetched for it)."""

    def training_step(self, batch, batch_idx):
        self.trained_on = batch[3].tolist()
        return super().training_step(batch, batch_idx)


class RecordSamples(Callback):
    """One line per completed step: epoch, global step, the sample indices this rank trained on."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(out / f"samples-{self.pid}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step,
                                "world": trainer.world_size, "index": pl_module.trained_on,
                                "loss": float(outputs["loss"])}) + "\n")

    def setup(self, trainer, pl_module, stage):
        import os

        self.pid = os.getpid()


strategy = STRATEGIES.build(settings.get("strategy", "mpi"), {})
model = Recording(lr=0.05)
callbacks = [RecordSamples(), FaultTolerantCheckpoint(out / "checkpoints", every_n_steps=int(settings.get("every", 2)))]
if fault:
    callbacks.append(FaultInjector(parse_fault(fault)))
out.mkdir(parents=True, exist_ok=True)
resume = choose_checkpoint("auto", out) if strategy.global_rank == 0 else None
resume = strategy.comm.broadcast_object(resume) if hasattr(strategy, "comm") else resume
trainer = Trainer(strategy=strategy, accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                  plugins=[VerifiedCheckpointIO()], default_root_dir=str(out))
trainer.fit(model, TinyData(batch_size=2, n_train=30, with_index=True), ckpt_path=resume)
final = trainer.validate(model, TinyData(batch_size=2, n_train=30, with_index=True), verbose=False)[0]
if trainer.is_global_zero:
    torch.save({"state": model.state_dict(), "final": final, "steps": trainer.global_step,
                "world": trainer.world_size, "summary": strategy.summary_metrics()}, out / "result.pt")
    (out / "COMPLETED").write_text("done\n")
if getattr(strategy, "recoveries", None):
    from lightning_xd.ulfm import leave_after_failure

    leave_after_failure()  # MPI_Finalize may hang on the lost process
