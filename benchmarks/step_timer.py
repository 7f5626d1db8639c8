"""Per-step timings of a training run, taken at Lightning's hooks, identical for every strategy.

A step lasts from ``on_train_batch_start`` to ``on_train_batch_end`` (the batch is already
loaded; forward, backward, gradient exchange and optimizer step are inside), as in
``RunSummary``. On the way the timer notes ``on_before_optimizer_step``, so a strategy whose
exchange lives in its optimizer step (``async``: push, pull) can be split there.

Measuring without communication: after warm-up, every other step can run with the gradient
exchange switched off by the strategy's own ``block_backward_sync()`` (the switch Lightning uses
while accumulating gradients; DDP's ``no_sync``, the ``mpi`` strategy's buckets off). Those
steps do the same forward, backward and optimizer work and exchange no gradients; their
duration is the step's compute. ``align`` starts every step of a synchronous run with a barrier
(outside the timed window), so that steps start together and a step's duration holds only
that step's own waiting.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from lightning.pytorch import Callback

from lightning_xd.callbacks.run_summary import batch_size_of
from lightning_xd.comm.communicator import world


@dataclass(frozen=True)
class StepRecord:
    index: int  # position in this process's run, warm-up included
    exchange: bool  # False: the gradient exchange was switched off
    seconds: float
    before_optimizer_s: float | None  # from the step's start to on_before_optimizer_step
    samples: int


class StepTimer(Callback):
    def __init__(self, warmup: int, switch_exchange_off: bool = False, align: bool = False):
        self.warmup, self.switch_exchange_off, self.align = warmup, switch_exchange_off, align
        self.steps: list[StepRecord] = []
        self.train_seconds = 0.0
        self._index = 0
        self._switch: Any = None
        self._start = self._before_optimizer = None

    def _exchange_on(self, index: int) -> bool:
        return not (self.switch_exchange_off and index >= self.warmup and (index - self.warmup) % 2 == 1)

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds = time.perf_counter() - self._train_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.align:
            world().barrier()
        if not self._exchange_on(self._index):
            self._switch = trainer.strategy.block_backward_sync()
            self._switch.__enter__()
        self._before_optimizer = None
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._before_optimizer = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = time.perf_counter()
        if self._switch is not None:
            self._switch.__exit__(None, None, None)
            self._switch = None
        if self._index >= self.warmup:
            before = None if self._before_optimizer is None else self._before_optimizer - self._start
            self.steps.append(
                StepRecord(self._index, self._exchange_on(self._index), end - self._start, before, batch_size_of(batch))
            )
        self._index += 1

    def gather(self) -> list[list[StepRecord]]:
        """Every process's steps, in rank order (a collective: every rank calls it)."""
        return world().allgather_object(self.steps)


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def by_index(per_rank: list[list[StepRecord]], exchange: bool) -> list[list[StepRecord]]:
    """Steps of the same index on every rank that took any, for the steps with (or without) exchange."""
    ranks = [{s.index: s for s in steps if s.exchange == exchange} for steps in per_rank if steps]
    common = sorted(set.intersection(*(set(r) for r in ranks))) if ranks else []
    return [[r[i] for r in ranks] for i in common]


def step_seconds(per_rank: list[list[StepRecord]], exchange: bool = True) -> float:
    """Median over steps of the ranks' mean step duration."""
    return median(statistics.fmean(s.seconds for s in step) for step in by_index(per_rank, exchange))


def wait_for_slowest(per_rank: list[list[StepRecord]]) -> float:
    """Median over exchange-off steps of (slowest rank's duration - mean duration): what a rank of a
    synchronous step waits for the slowest one, even if communication were free."""
    return median(
        max(s.seconds for s in step) - statistics.fmean(s.seconds for s in step) for step in by_index(per_rank, False)
    )


def samples_per_s(per_rank: list[list[StepRecord]], samples_divisor: int = 1) -> float:
    """Samples of all ranks over the slowest rank's time in (exchange-on) steps, as ``RunSummary``.
    ``samples_divisor``: processes that read the same samples (a pipeline's stages) count them once."""
    samples = sum(s.samples for steps in per_rank for s in steps if s.exchange) / samples_divisor
    slowest = max((sum(s.seconds for s in steps if s.exchange) for steps in per_rank if steps), default=0.0)
    return samples / slowest if slowest else float("nan")
