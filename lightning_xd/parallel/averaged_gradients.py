"""Synchronous gradient averaging over a strategy's replicas, mixed into an ``MPIStrategy``.

During backward each gradient bucket starts a non-blocking allreduce as soon as it is complete
(``GradientBuckets``); after backward the strategy waits for the buckets and averages, so every
replica takes the same optimizer step. Running statistics (BatchNorm) follow the first replica
before each batch, as with DDP's ``broadcast_buffers``; ``Trainer(sync_batchnorm=True)`` swaps
Lightning's torch.distributed SyncBatchNorm for one over MPI. While gradients accumulate over
several batches nothing is exchanged (``block_backward_sync``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_xd.comm.communicator import Communicator
from lightning_xd.parallel.gradient_buckets import GradientBuckets


class AveragedGradients:
    """Mixin for an ``MPIStrategy``: gradients averaged over ``replicas`` after every backward."""

    def __init__(
        self,
        bucket_size_mb: float | None = None,
        find_unused_parameters: bool = False,
        overlap: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.bucket_size_mb, self.find_unused_parameters, self.overlap = bucket_size_mb, find_unused_parameters, overlap
        self.gradients: GradientBuckets | None = None

    def gradient_sync(self) -> GradientBuckets:
        """What averages gradients after backward: buckets over the whole model."""
        return GradientBuckets(
            self.model, self.replicas, self.bucket_size_mb, self.find_unused_parameters, self.overlap
        )

    @override
    def setup(self, trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self._layer_sync is not None and fitting:
            from lightning_xd.parallel.sync_batchnorm import MPISyncBatchNorm

            # Lightning hands us its torch.distributed SyncBatchNorm, which needs a process group (and a GPU)
            self._layer_sync = MPISyncBatchNorm(lambda: self.replicas)
            self.model = self._layer_sync.apply(self.model)
        super().setup(trainer)
        if fitting:
            self.gradients = self.gradient_sync()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.run_collective(self.broadcast_buffers, "broadcasting buffers")

    @override
    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        """Before backward: the buckets follow the parameters that now require gradients."""
        if self.gradients is not None:
            self.gradients.prepare_for_backward(closure_loss)

    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """Wait for the gradient buckets and average: every replica now holds the same gradients."""
        if self.gradients is not None and self.gradients.active:  # not while gradients accumulate
            self.gradients.synchronize()
            self.after_gradient_sync()

    @override
    @contextmanager
    def block_backward_sync(self):
        """No gradient exchange while gradients accumulate over several batches."""
        if self.gradients is None:
            yield
            return
        self.gradients.enabled = False
        try:
            yield
        finally:
            self.gradients.enabled = True

    def use_communicator(self, comm: Communicator) -> None:
        super().use_communicator(comm)
        if self.gradients is not None:
            self.gradients.remove()
            self.gradients = self.gradient_sync()

    @override
    def teardown(self) -> None:
        if self.gradients is not None:
            self.gradients.remove()
            self.gradients = None
        if self._layer_sync is not None and self.model is not None:
            self.model = self._layer_sync.revert(self.model)
        super().teardown()
