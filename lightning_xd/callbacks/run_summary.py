"""Training throughput and epoch times, measured the same way for every strategy.

``samples_per_s`` counts the training samples of all ranks over the slowest rank's time spent
in training steps (forward, backward, gradient exchange, optimizer step), so strategies are
compared on the work they share; ``updates_per_s`` is optimizer updates over that same time;
``epoch_time_s_mean`` is wall-clock per epoch, validation included.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_xd.contract import declared


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: PyG batches say it themselves, other batches by their first tensor."""
    size = getattr(batch, "batch_size", None)
    if isinstance(size, int):
        return size
    return extract_batch_size(batch)


class RunSummary(Callback):
    def __init__(self) -> None:
        self.samples = 0
        self.steps = 0  # training steps this process took (a worker's own, under async)
        self.step_seconds = 0.0
        self.epoch_seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_samples, self._epoch_step_seconds = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._step_start
        # processes that work on each batch together (a pipeline's stages) count it once between them
        samples = batch_size_of(batch) / declared(trainer.strategy).batch_sharing_processes
        self.samples += samples
        self.steps += 1
        self.step_seconds += seconds
        self._epoch_samples += samples
        self._epoch_step_seconds += seconds

    def on_train_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts without that hook

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds = time.perf_counter() - self._fit_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # This process's own rate: a collective here would make asynchronous workers wait.
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)
        rate = self._epoch_samples / max(self._epoch_step_seconds, 1e-9)
        pl_module.log("perf/rank_samples_per_s", rate, on_epoch=True, on_step=False, rank_zero_only=True)

    def totals(self, trainer) -> dict:
        """Whole-job figures, once training is over (every rank must call it: it reduces)."""
        device = trainer.strategy.root_device
        samples = trainer.strategy.reduce(torch.tensor(float(self.samples), device=device), reduce_op="sum")
        slowest = trainer.strategy.reduce(torch.tensor(self.step_seconds, device=device), reduce_op="max")
        own_step = self.step_seconds / self.steps if self.steps else 0.0
        slowest_step = trainer.strategy.reduce(torch.tensor(own_step, device=device), reduce_op="max")
        train_seconds = getattr(self, "train_seconds", 0.0)
        return {
            "samples_per_s": float(samples) / max(float(slowest), 1e-9),
            "epoch_time_s_mean": sum(self.epoch_seconds) / max(1, len(self.epoch_seconds)),
            "epochs": len(self.epoch_seconds),
            "global_step": trainer.global_step,
            "train_time_s": train_seconds,
            "step_time_s_mean": float(slowest_step),  # the slowest process's mean step
            "updates_per_s": trainer.global_step / max(float(slowest), 1e-9),
        }
