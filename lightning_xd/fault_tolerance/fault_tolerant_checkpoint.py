"""Checkpoints that survive the failures they are for (``--ckpt-every-steps``, ``--ckpt-every-seconds``).

Saved every N steps and/or T seconds, at epoch ends and when training ends, through Lightning's own
``trainer.save_checkpoint`` (so model, optimizer and LR-scheduler state, loop progress, the
training loader's position inside the epoch, callback and datamodule state all use Lightning's
hooks). The strategy's checkpoint IO (``VerifiedCheckpointIO``, by default in the background behind
``BackgroundCheckpointIO``) writes them atomically with a sha256 manifest and keeps the last K. An
epoch end is skipped while the newest checkpoint is younger than ``min_seconds``: epochs of one or
a few steps (a full-graph GCN, the ECG autoencoder) would otherwise spend more time checkpointing
than training. This callback's own state is every process's random-number-generator state, so a
resumed run draws the same dropout masks as an uninterrupted one. ``run`` (the model, dataset and
strategy names, which the runner knows and the Trainer does not) goes into every manifest, so a
checkpoint is never resumed by a run of another kind.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from lightning_xd.comm.collectives import gather_objects
from lightning_xd.contract import declared
from lightning_xd.fault_tolerance.checkpoints import CheckpointStore


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class FaultTolerantCheckpoint(Checkpoint):
    def __init__(
        self,
        dirpath: str | Path,
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
        min_seconds: float = 0.0,
        run: dict[str, str] | None = None,
    ):
        self.store = CheckpointStore(dirpath)
        self.run = run
        self.every_n_steps, self.every_n_seconds, self.min_seconds = every_n_steps, every_n_seconds, min_seconds
        self._last_save = time.monotonic()
        self._last_step_saved = -1
        self._kind = "step"
        self.save_seconds: list[float] = []  # how long each save stalled training

    # ---- when ---------------------------------------------------------------------------------
    def _due(self, trainer) -> bool:
        by_steps = bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
        return by_steps or (bool(self.every_n_seconds) and self._older_than(trainer, self.every_n_seconds))

    def _older_than(self, trainer, seconds: float) -> bool:
        """Whether the newest checkpoint is older than ``seconds``, by the first process's clock: every
        process must decide alike, since saving is collective."""
        older = time.monotonic() - self._last_save >= seconds
        if trainer.world_size > 1 and not declared(trainer.strategy).saves_own_checkpoints:
            _sync_logged_metrics(trainer)
            older = bool(trainer.strategy.broadcast(older, src=0))
        return older

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._due(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Validation and the epoch's end still draw random numbers after the last batch: saved here,
            # a resumed run would replay them from the wrong state. The epoch end saves it instead.
            self._epoch_end_due = True
            return
        self.save(trainer, "step")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        due, self._epoch_end_due = self._epoch_end_due, False
        if due or self._older_than(trainer, self.min_seconds):
            self.save(trainer, "epoch")

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, "end")  # the final state, whatever the epoch-end throttle skipped

    # ---- how ----------------------------------------------------------------------------------
    def save(self, trainer, kind: str) -> None:
        """Every process takes part (Lightning gathers state); the first one writes and commits."""
        if trainer.fast_dev_run or trainer.sanity_checking or declared(trainer.strategy).saves_own_checkpoints:
            return
        step = trainer.global_step
        if step == self._last_step_saved:
            return
        started = time.perf_counter()
        _sync_logged_metrics(trainer)
        self._kind = kind
        trainer.save_checkpoint(self.store.folder / f"step-{step:09d}.ckpt", weights_only=False)  # all of it
        self._last_save, self._last_step_saved = time.monotonic(), step
        self.save_seconds.append(time.perf_counter() - started)

    # ---- what it adds to the checkpoint: every process's random state --------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None:
            return {"rng": [rng_state()]}
        return {
            "rng": gather_objects(trainer.strategy, rng_state()),
            "manifest_info": checkpoint_info(trainer, self._kind, self.run),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng", [])
        rank = self._trainer.global_rank if self._trainer is not None else 0
        # Applied just before the next training step: anything drawn in between (a sanity check,
        # a validation loader) would otherwise shift the sequence.
        self._rng_to_restore = states[rank] if rank < len(states) else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    _trainer = None
    _epoch_end_due = False
    _rng_to_restore: dict | None = None


def _sync_logged_metrics(trainer) -> None:
    """Epoch metrics logged with sync_dist are reduced lazily, on first read, and at an epoch end the
    progress bar reads them on the first process only: reading them on every process before any
    collective of ours keeps every process's collectives in the same order."""
    _ = trainer.callback_metrics


def checkpoint_info(trainer, kind: str, run: dict[str, str] | None = None) -> dict[str, Any]:
    """What a manifest records about the run that wrote the checkpoint; ``run``: the model, dataset
    and strategy names it was started with (``runner.run_identity``), where known. ``pipeline_stages``:
    the processes each batch passes through (a pipeline's stages; 1 where every process runs the
    whole model)."""
    strategy = trainer.strategy
    return {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "kind": kind,
        "world_size": trainer.world_size,
        "strategy": type(strategy).__name__,
        "pipeline_stages": declared(strategy).batch_sharing_processes,
        **({"run": dict(run)} if run else {}),
    }
