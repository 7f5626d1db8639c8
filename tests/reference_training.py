"""The one home of the reference trainers: a model trained in one process with Lightning's own single-device
loop, which a strategy's result is compared with.

Lightning shards every training loader of a distributed strategy with a ``DistributedSampler`` (seed 0,
reshuffled each epoch where the loader shuffled, in order where it did not). ``StepOrder`` replays that: one
process reads, for each step, the k-th batch of every rank one after the other, as one batch. So

- ``fit_one_process(make_model, in_step_order(data, replicas=2))`` is what two ranks of a synchronous strategy
  must end with: one process trained on the union of each step's batches (the mean loss over the union is the
  mean of the ranks' equal-sized means, and a BatchNorm on the union is what sync_batchnorm must compute);
- ``fit_one_process(make_model, in_step_order(data, replicas=1))`` is the async strategy with one worker: one
  process reading the whole training set in the order of a one-replica ``DistributedSampler``, the server
  applying each of its gradients in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, DistributedSampler, Sampler

QUIET = dict(
    accelerator="cpu",
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    enable_checkpointing=False,
)


class StepOrder(Sampler[int]):
    """The samples of ``size`` in the order ``replicas`` ranks train on them: per step, each rank's batch."""

    def __init__(self, size: int, replicas: int, batch_size: int, drop_last: bool = False, shuffle: bool = True):
        self.size, self.replicas, self.batch_size, self.drop_last = size, replicas, batch_size, drop_last
        self.shuffle = shuffle  # Lightning's sampler shuffles only where the loader's own sampler did
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self) -> list[list[int]]:
        """What each rank trains on in this epoch, in order, as Lightning's sampler hands it out."""
        shards = []
        for rank in range(self.replicas):
            sampler = DistributedSampler(
                range(self.size), num_replicas=self.replicas, rank=rank, shuffle=self.shuffle, seed=0
            )
            sampler.set_epoch(self.epoch)
            shards.append(list(sampler))
        return shards

    def __iter__(self):
        shards = self.shards()
        steps = len(shards[0]) // self.batch_size if self.drop_last else -(-len(shards[0]) // self.batch_size)
        for k in range(steps):
            for shard in shards:
                yield from shard[k * self.batch_size : (k + 1) * self.batch_size]

    def __len__(self) -> int:
        return sum(1 for _ in self)


def in_step_order(dataset, replicas: int, batch_size: int, drop_last: bool = False, shuffle: bool = True) -> DataLoader:
    """One process's loader whose batches are the union of ``replicas`` ranks' batches of each step."""
    sampler = StepOrder(len(dataset), replicas, batch_size, drop_last, shuffle)
    return DataLoader(dataset, batch_size=replicas * batch_size, sampler=sampler)


def one_process_trainer(plugins: Iterable = (), **settings) -> Trainer:
    """A quiet CPU Trainer on one device. The environment is our own: Lightning's probe for MPI must not run
    outside an MPI job."""
    return Trainer(**{**QUIET, "devices": 1, **settings}, plugins=[LightningEnvironment(), *plugins])


def fit_one_process(
    make_model: Callable[[], LightningModule],
    train,
    epochs: int = 1,
    callbacks: Iterable[Callback] = (),
    plugins: Iterable = (),
    **settings,
) -> tuple[Trainer, LightningModule]:
    """The reference trainer: ``make_model()`` (under seed 0) fitted on ``train`` (a loader, usually
    ``in_step_order``, or a datamodule) for ``epochs`` without validation; ``settings`` go to the Trainer
    (``max_epochs``, ``limit_val_batches`` there win). Returns the trainer and the fitted model."""
    torch.manual_seed(0)
    model = make_model()
    trainer = one_process_trainer(
        plugins=plugins, **{"max_epochs": epochs, "limit_val_batches": 0, "callbacks": list(callbacks), **settings}
    )
    trainer.fit(model, train)
    return trainer, model


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class StateAfterEachBatch(Callback):
    """The model's parameters after every training batch."""

    def __init__(self):
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots.append(state_of(pl_module))
