"""Training throughput and epoch times, measured the same way for every strategy.

``samples_per_s`` counts the training samples of all ranks over the time spent in training
steps (forward, backward, gradient exchange, optimizer step), so strategies are compared on
the work they share; ``epoch_time_s_mean`` is wall-clock per epoch, validation included.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.data import extract_batch_size


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: PyG batches say it themselves, other batches by their first tensor."""
    size = getattr(batch, "batch_size", None)
    if isinstance(size, int):
        return size
    return extract_batch_size(batch)


class RunSummary(Callback):
    def __init__(self) -> None:
        self.samples = 0
        self.step_seconds = 0.0
        self.epoch_seconds: list[float] = []
        self.totals: dict[str, float] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_samples, self._epoch_step_seconds = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._step_start
        samples = batch_size_of(batch)
        self.samples += samples
        self.step_seconds += seconds
        self._epoch_samples += samples
        self._epoch_step_seconds += seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)
        rate = self._global_rate(trainer, self._epoch_samples, self._epoch_step_seconds)
        pl_module.log("perf/samples_per_s", rate, on_epoch=True, on_step=False, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self.totals = {
            "samples_per_s": self._global_rate(trainer, self.samples, self.step_seconds),
            "epoch_time_s_mean": sum(self.epoch_seconds) / max(1, len(self.epoch_seconds)),
            "epochs": len(self.epoch_seconds),
            "global_step": trainer.global_step,
        }

    @staticmethod
    def _global_rate(trainer, samples: int, seconds: float) -> float:
        """All ranks' samples over the slowest rank's time: every rank must call it."""
        device = trainer.strategy.root_device
        total = trainer.strategy.reduce(torch.tensor(float(samples), device=device), reduce_op="sum")
        slowest = trainer.strategy.reduce(torch.tensor(seconds, device=device), reduce_op="max")
        return float(total) / max(float(slowest), 1e-9)
