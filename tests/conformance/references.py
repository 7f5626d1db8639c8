"""One-process references, run in the pytest process with Lightning's own single-device training.

Lightning shards every training loader of a distributed strategy with a ``DistributedSampler`` (seed 0,
reshuffled each epoch where the loader shuffled, in order where it did not). ``StepOrder`` replays that: one
process reads, for each step, the k-th batch of every rank one after the other, as one batch.

``union``: what two ranks of a synchronous strategy must end with: one process trained on the union of each
step's batches (the mean loss over the union is the mean of the ranks' equal-sized means, and a BatchNorm
on the union is what sync_batchnorm must compute).

``one_worker``: the async strategy with one worker is one process reading the whole training set in the
order of a one-replica ``DistributedSampler``, the server applying each of its gradients in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from conformance.harness import QUIET, fit_summary
from conformance.models import BATCH, RecordTraining, SeedAtFirstBatch, boring_data, token_data, transformer


class StepOrder(Sampler[int]):
    """The samples of ``size`` in the order ``replicas`` ranks train on them: per step, each rank's batch."""

    def __init__(self, size: int, replicas: int, batch_size: int, drop_last: bool = False, shuffle: bool = True):
        self.size, self.replicas, self.batch_size, self.drop_last = size, replicas, batch_size, drop_last
        self.shuffle = shuffle  # Lightning's sampler shuffles only where the loader's own sampler did
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self) -> list[list[int]]:
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


def in_step_order(
    dataset, replicas: int, batch_size: int = BATCH, drop_last: bool = False, shuffle: bool = True
) -> DataLoader:
    """One process's loader whose batches are the union of ``replicas`` ranks' batches of each step."""
    sampler = StepOrder(len(dataset), replicas, batch_size, drop_last, shuffle)
    return DataLoader(dataset, batch_size=replicas * batch_size, sampler=sampler)


def fit_one_process(
    make_model: Callable, train: DataLoader, epochs: int = 1, callbacks: tuple = (), **settings
) -> dict:
    torch.manual_seed(0)
    model, record = make_model(), RecordTraining()
    trainer = Trainer(
        devices=1,
        plugins=[LightningEnvironment()],
        max_epochs=epochs,
        limit_val_batches=0,
        callbacks=[record, *callbacks],
        **{**QUIET, **settings},
    )
    trainer.fit(model, train)
    return fit_summary(trainer, model, record)


@cache
def union(name: str) -> dict:
    """The ``mpi`` cases whose expected result is one process on the union of both ranks' batches."""
    from conformance.models import (
        BoringWithBackbone,
        ClassifierData,
        MetricClassifier,
        TwoOptimizerGAN,
        backbone_finetuning,
    )

    if name == "unfreeze":
        return fit_one_process(
            BoringWithBackbone, in_step_order(boring_data(), 2), epochs=2, callbacks=(backbone_finetuning(),)
        )
    if name in ("gan_toggled", "gan_untoggled"):
        return fit_one_process(lambda: TwoOptimizerGAN(toggle=name == "gan_toggled"), in_step_order(boring_data(), 2))
    if name == "sync_batchnorm":
        return fit_one_process(MetricClassifier, in_step_order(ClassifierData().sets["train"], 2))
    raise ValueError(name)


@cache
def one_worker(name: str, threads: int) -> dict:
    """The async cases on one worker: one process on the whole training set, in order, batches of BATCH,
    computed with the worker's number of threads (another splits sums differently: the transformer then
    drifts by 1e-4 in 8 steps)."""
    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _one_worker(name)
    finally:
        torch.set_num_threads(own)


def _one_worker(name: str) -> dict:
    from lightning.pytorch.demos.boring_classes import BoringModel

    from conformance.models import (
        BoringStepSchedule,
        BoringWithBackbone,
        BoringWithUnused,
        ClassifierData,
        MetricClassifier,
        TwoOptimizerGAN,
        backbone_finetuning,
    )

    boring = in_step_order(boring_data(), 1)
    if name == "boring_fit":
        return fit_one_process(BoringModel, boring, epochs=2)
    if name == "step_schedule":
        return fit_one_process(BoringStepSchedule, boring)
    if name == "accumulate_clip":
        return fit_one_process(BoringModel, boring, accumulate_grad_batches=3, gradient_clip_val=0.05)
    if name == "drop_last":
        return fit_one_process(BoringModel, in_step_order(boring_data(70), 1, 8, drop_last=True), epochs=2)
    if name == "unused":
        return fit_one_process(BoringWithUnused, boring)
    if name == "unfreeze":
        return fit_one_process(BoringWithBackbone, boring, epochs=2, callbacks=(backbone_finetuning(),))
    if name == "gan_toggled":
        return fit_one_process(lambda: TwoOptimizerGAN(toggle=True), boring)
    if name == "classifier":
        return fit_one_process(MetricClassifier, in_step_order(ClassifierData().sets["train"], 1), epochs=2)
    if name in ("transformer", "transformer_bf16"):
        settings = {"precision": "bf16-mixed"} if name == "transformer_bf16" else {}
        return fit_one_process(transformer, in_step_order(token_data(), 1), callbacks=(SeedAtFirstBatch(),), **settings)
    raise ValueError(name)


def boring_rows() -> torch.Tensor:
    return boring_data().data
