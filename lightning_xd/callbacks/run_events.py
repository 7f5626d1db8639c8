"""The run's story, step by step: epoch boundaries, checkpoint saves, lost processes and restarts.

Every process keeps the same list of events, ``{"step", "kind", "label", ...details}``, for the
dashboard to draw as labelled markers on its step axes; the first process also writes each one to
TensorBoard as it happens, as text under ``events/<kind>`` ("step 60: lost rank 1: 3->2", with its
details), and the job's size every step (the scalar ``events/world_size``), so that both views agree.
(TensorBoard keeps 10 texts per tag unless started with ``--samples_per_plugin text=1000``: with one
tag per kind, many epochs never push a lost process or a restart out.)

Where each kind comes from:

- ``epoch``: the start of every epoch after the first, at the step it starts from;
- ``checkpoint``: ``on_save_checkpoint``, so every full checkpoint, whoever saves it;
- ``lost``: the strategy's record of in-job recoveries (``recoveries()``: the ranks lost, the world
  size before and after, at the step the loss was noticed), taken as each appears;
- ``restart``: the start of training from a checkpoint. Under the supervisor (``XD_ATTEMPT`` > 0)
  every restart of the run is drawn at the step it resumed from, with the steps it redid, from the
  supervisor's record of its attempts (``attempts.json`` in the run dir, written before each
  relaunch); a run resumed by hand is marked "resumed from step S".

Why the list lives in the checkpoint (``state_dict``): a resumed run starts with exactly the events of
the history it resumes, as its curves do (the dashboard saves those the same way), and not those of
the steps after the checkpoint that it is about to redo. Restarts happen between checkpoints, so they
are read again from the supervisor's record at every start: an attempt that failed before writing a
checkpoint of its own still shows as a restart in the next one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xd.contract import declared
from lightning_xd.fault_tolerance.supervisor import read_attempts, restarts


class RunEvents(Callback):
    """The run's events (``events``), recorded by every process; ``run_dir`` holds the supervisor's record."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.events: list[dict[str, Any]] = []
        self._recoveries_seen = 0

    def record(self, trainer, step: int, kind: str, label: str, **details: Any) -> None:
        """Add an event (once: the same kind, step and label again is the same event)."""
        event = {"step": int(step), "kind": kind, "label": label, **details}
        if any((e["step"], e["kind"], e["label"]) == (event["step"], kind, label) for e in self.events):
            return
        self.events.append(event)
        if not trainer.is_global_zero:
            return
        extra = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in details.items())
        line = f"step {step}: {label}" + (f" ({extra})" if extra else "")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(f"events/{kind}", line, step)  # a tag per kind: rare ones never sampled out

    # ---- the kinds ---------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        attempt, start = int(os.environ.get("XD_ATTEMPT", "0")), trainer.global_step
        if attempt == 0 and start == 0:
            return  # a fresh start
        attempts = read_attempts(self.run_dir)[:attempt] if attempt else []
        supervised = restarts([*attempts, {"started_step": start}]) if len(attempts) == attempt else []
        for number, restart in enumerate(supervised, 1):
            label = f"restart {number}: {restart['steps_redone']} steps redone"
            self.record(trainer, restart["resumed_step"], "restart", label, failed_at_step=restart["failed_step"])
        if not supervised:
            self.record(trainer, start, "restart", f"resumed from step {start}")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:
            self.record(trainer, trainer.global_step, "epoch", f"epoch {trainer.current_epoch}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self.record(trainer, trainer.global_step, "checkpoint", "checkpoint")
        checkpoint["callbacks"][self.state_key] = self.state_dict()  # with this save: the resumed run starts here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._take_recoveries(trainer)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"events/world_size": float(trainer.world_size)}, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._take_recoveries(trainer)  # a loss survived outside a step (the epoch's end)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._take_recoveries(trainer)

    def _take_recoveries(self, trainer) -> None:
        """The strategy's in-job recoveries not taken yet, as ``lost`` events."""
        recoveries = declared(trainer.strategy).recoveries()
        for recovery in recoveries[self._recoveries_seen :]:
            lost = ",".join(str(r) for r in recovery["lost_ranks"])
            before, after = recovery["world_before"], recovery["world_after"]
            self.record(
                trainer,
                recovery["global_step"],
                "lost",
                f"lost rank {lost}: {before}->{after}",
                world_before=before,
                world_after=after,
            )
        self._recoveries_seen = len(recoveries)

    # ---- kept in every checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"events": [dict(e) for e in self.events]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = [dict(e) for e in state_dict.get("events", [])]
