"""Training data that can resume mid-epoch, on any number of processes.

An epoch is one permutation of the dataset (seeded by seed + epoch, exactly as torch's
``DistributedSampler`` draws it, so an uninterrupted run sees the same batches as with
Lightning's own sampler). Progress through the epoch is a position in that permutation, counted
over all processes: after k steps of W processes with batches of B, the first k*B*W entries are
done. Resuming, or going on with fewer processes after a failure, shards what is left of the
permutation over the processes there are now, so no sample of the epoch is dropped or repeated.

``ResumableLoader`` wraps a training DataLoader. Lightning fetches batches of a sized loader one
at a time, just before training on them, so a re-sharding takes effect from the next batch on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler
from typing_extensions import override


class EpochShardSampler(Sampler[int]):
    """This process's share of what is left of one epoch's permutation, from ``start`` on."""

    def __init__(
        self, size: int, replicas: int, rank: int, epoch: int, start: int = 0, shuffle: bool = True, seed: int = 0
    ):
        self.size, self.replicas, self.rank = size, replicas, rank
        self.epoch, self.start, self.shuffle, self.seed = epoch, start, shuffle, seed

    def order(self) -> list[int]:
        """The whole epoch's order, padded (as DistributedSampler pads) to a multiple of the processes."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        total = math.ceil(self.size / self.replicas) * self.replicas
        return (order * math.ceil(total / max(1, len(order))))[:total] if order else []

    def remaining(self) -> list[int]:
        rest = self.order()[self.start :]
        padded = math.ceil(len(rest) / self.replicas) * self.replicas
        return (rest * math.ceil(padded / max(1, len(rest))))[:padded] if rest else []

    def __iter__(self) -> Iterator[int]:
        return iter(self.remaining()[self.rank :: self.replicas])

    def __len__(self) -> int:
        return math.ceil(max(0, len(self.order()) - self.start) / self.replicas)


class ResumableLoader:
    """A training DataLoader whose epoch can start at any position, on any number of processes.

    ``shards()`` gives (processes, this rank) when an epoch (or a re-sharding) starts;
    ``progress()`` gives the steps Lightning has completed in the current epoch. The position
    is saved and restored through Lightning's own ``state_dict`` / ``load_state_dict`` protocol
    for resumable loaders. Other attributes (``dataset``, ``batch_size`` ...) are the wrapped
    loader's, so Lightning treats this as the loader itself.
    """

    def __init__(
        self,
        loader: DataLoader,
        shards: Callable[[], tuple[int, int]],
        progress: Callable[[], int],
        rebuild: Callable,
        on_length: Callable[[int, bool], None] = lambda batches, mid_epoch: None,
    ):
        self.loader, self.shards, self.progress, self._rebuild = loader, shards, progress, rebuild
        self.on_length = on_length  # tells Lightning how many batches the current epoch has
        sampler = loader.sampler
        self.shuffle = isinstance(sampler, RandomSampler) or bool(getattr(sampler, "shuffle", False))
        self.seed = getattr(sampler, "seed", int(os.environ.get("PL_GLOBAL_SEED", 0)))
        self.epoch = 0
        self.start = 0  # position in the epoch's order where the current sharding began
        self.steps_at_start = 0  # Lightning's completed steps in this epoch at that moment
        self.pending: dict | None = None  # a restored position, used by the next iteration
        self.replicas, self.rank = 1, 0
        self._epoch_batches: int | None = None
        self._iterator: Iterator | None = None
        # The optimizer step's window (see lightning_xd.fault_tolerance.recovery): (steps, position) where it began, and
        # whether a failure inside it means it must be trained again from there.
        self.window: tuple[int, int] | None = None
        self.window_stale = False
        self.padding = 0  # samples the newest re-shard repeats so that every process gets as many

    # ---- what Lightning sees ----------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    @property
    def sampler(self) -> ResumableLoader:
        return self  # Lightning calls sampler.set_epoch(epoch) before every epoch

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before every epoch: the epoch's length follows the processes there are now."""
        self.epoch = epoch
        replicas, rank = self.shards()
        resume = self._resume_state()
        if resume:  # the steps already done (by however many processes) + what is left here
            left = self._sampler(replicas, rank, resume["position"])
            self._set_length(resume["steps"] + self._batches(len(left)))
        else:
            self._set_length(self._batches(len(self._sampler(replicas, rank, 0))))

    def _set_length(self, batches: int, mid_epoch: bool = False) -> None:
        self._epoch_batches = batches
        self.on_length(batches, mid_epoch)

    def _resume_state(self) -> dict | None:
        return self.pending if self.pending and self.pending["epoch"] == self.epoch else None

    def __len__(self) -> int:
        """Batches of the current epoch (a whole one on the current number of processes, unless resumed)."""
        if self._epoch_batches is not None:
            return self._epoch_batches
        replicas, _ = self.shards()
        return self._batches(len(self._sampler(replicas, 0, 0)))

    def __iter__(self) -> Iterator[Any]:
        resume = self._resume_state()
        self.pending = None
        self.start = resume["position"] if resume else 0
        self.steps_at_start = resume["steps"] if resume else 0
        self.window, self.window_stale = None, False
        self._reshard()
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "steps": self.progress(), "replicas": self.replicas}

    def load_state_dict(self, state: dict) -> None:
        self.pending = dict(state)

    # ---- position and re-sharding -------------------------------------------------------------
    def _batches(self, samples: int) -> int:
        """Batches the wrapped loader makes of ``samples``: an incomplete last one only without drop_last
        (Lightning ends the epoch, and runs validation, after the number of batches we report)."""
        if self.loader.drop_last:
            return samples // self._batch_size
        return math.ceil(samples / self._batch_size)

    @property
    def _batch_size(self) -> int:
        return self.loader.batch_size or 1

    @property
    def position(self) -> int:
        """How far the epoch has got, in entries of its order, counted over every process."""
        return self.start + (self.progress() - self.steps_at_start) * self._batch_size * self.replicas

    def batches_left(self) -> int:
        """Batches this process still has to train on in the current epoch."""
        return self._batches(len(self._sampler(self.replicas, self.rank, self.position)))

    def _sampler(self, replicas: int, rank: int, start: int) -> EpochShardSampler:
        return EpochShardSampler(len(self.loader.dataset), replicas, rank, self.epoch, start, self.shuffle, self.seed)

    def _reshard(self) -> None:
        self.replicas, self.rank = self.shards()
        sampler = self._sampler(self.replicas, self.rank, self.start)
        self.padding = len(sampler.remaining()) - max(0, len(sampler.order()) - self.start)
        loader = self._rebuild(self.loader, sampler)
        state = torch.get_rng_state()  # making an iterator draws from the global RNG: keep runs comparable
        self._iterator = iter(loader)
        torch.set_rng_state(state)

    @property
    def iterating(self) -> bool:
        return self._iterator is not None

    def reshard_remaining(self) -> None:
        """Go on from the current position over the processes there are now (after a failure)."""
        self.start, self.steps_at_start = self.position, self.progress()
        self._reshard()
        self._set_length(self.progress() + self.batches_left(), mid_epoch=True)

    # ---- the optimizer step's window ----------------------------------------------------------
    def begin_window(self) -> None:
        """A batch is about to be trained: if no window is open, one opens here."""
        if self.window is None:
            self.window, self.window_stale = (self.progress(), self.position), False

    def end_window(self) -> None:
        """The window's optimizer step was taken on every process."""
        self.window, self.window_stale = None, False

    def invalidate_window(self) -> bool:
        """A failure: an open window must be trained again (returns whether one was open)."""
        self.window_stale = self.window is not None
        return self.window_stale

    def reshard_window(self) -> int:
        """Re-shard the epoch's rest from the start of the open window over the processes there are now;
        returns how many batches the window has had so far (its current one included), to train again."""
        steps, position = self.window if self.window is not None else (self.progress(), self.position)
        window_batches = self.progress() - steps + 1
        self.start, self.steps_at_start = position, steps
        self._reshard()
        # once the window is trained again, Lightning's count is steps + window_batches
        self._set_length(steps + self._batches(len(self._sampler(self.replicas, self.rank, position))), mid_epoch=True)
        self.window, self.window_stale = (steps, position), False
        return window_batches

    def next_batch(self) -> Any:
        """The next batch of this process's current shard (raises StopIteration at the end)."""
        return next(self._iterator)


def make_resumable(
    loader: Any,
    shards: Callable[[], tuple[int, int]],
    progress: Callable[[], int],
    on_length: Callable[[int, bool], None],
) -> Any:
    """Wrap a map-style training DataLoader (shuffled or sequential); leave anything else alone."""
    if not isinstance(loader, DataLoader) or isinstance(loader, ResumableLoader):
        return loader
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler, DistributedSampler)):
        return loader  # a sampler of the datamodule's own: it keeps its own order
    if loader.batch_sampler is None or not hasattr(loader.dataset, "__len__"):
        return loader
    from lightning.pytorch.utilities.data import _update_dataloader

    return ResumableLoader(
        loader, shards, progress, lambda original, sampler: _update_dataloader(original, sampler), on_length
    )


def training_loader(trainer) -> ResumableLoader | None:
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    for dl in loader.flattened if loader is not None else []:
        if isinstance(dl, ResumableLoader):
            return dl
    return None


def set_epoch_length(trainer, batches: int, mid_epoch: bool = False) -> None:
    """Tell Lightning's loop (and its fetcher, mid-epoch) how many batches the current epoch has; mid-epoch
    also whether the batch in hand is now the last (it may have been, before the epoch grew)."""
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage

    limit = _parse_num_batches(RunningStage.TRAINING, batches, trainer.limit_train_batches)
    fit_loop = trainer.fit_loop
    if fit_loop._combined_loader is not None:
        fit_loop._combined_loader.limits = [limit]
    fit_loop.max_batches = limit
    fetcher = fit_loop._data_fetcher
    if fetcher is not None and fetcher.length is not None:
        fetcher.length = limit
        fetcher.done = fetcher.fetched >= limit
        if mid_epoch:
            fit_loop.epoch_loop.batch_progress.is_last_batch = fetcher.done


class ResumableTrainingData:
    """Strategy mixin: the training loader becomes a ResumableLoader (mid-epoch resume, re-sharding)."""

    @override
    def process_dataloader(self, dataloader: Any) -> Any:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer
        if not trainer.training:
            return dataloader
        return make_resumable(
            dataloader,
            self.data_shards,
            lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            lambda batches, mid_epoch: set_epoch_length(trainer, batches, mid_epoch),
        )

    def data_shards(self) -> tuple[int, int]:
        """(processes that share the training data, this one's index among them)."""
        shards = getattr(self, "distributed_sampler_kwargs", None) or {}
        return shards.get("num_replicas", 1), shards.get("rank", 0)
