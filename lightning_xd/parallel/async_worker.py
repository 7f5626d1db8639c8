"""The worker's side of asynchronous training, as Lightning's loop sees it.

A worker's optimizer step is "compute, push, pull": ``PushPullOptimizer`` stands in for the real
optimizer so that Lightning drives the step as with any strategy. While the run trains, the server
decides when it stops and steps the LR schedules (``WorkerLimits`` sets the worker's own aside), and
while the optimizers are configured the epoch is the run's (``run_wide_epoch``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class PushPullOptimizer:
    """The optimizer as Lightning sees it on a worker: the real one, except that ``step()`` is "push, pull".

    The precision plugin runs the closure (forward and backward), ``on_before_optimizer_step``, gradient
    clipping and the GradScaler's unscale and inf check on the optimizer it is given, through its
    ``param_groups``, ``state``, ``zero_grad`` ...: every attribute this class does not define is the
    real optimizer's. ``step()`` sends the gradients, as they are after all of that, to the server and
    loads the parameters it answers with; the real optimizer never steps on a worker.
    """

    # The GradScaler unscales here, before the push, even for an optimizer that could unscale inside
    # its own step (fused Adam): the server must receive true gradients.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer, index: int, exchange: Callable[[PushPullOptimizer], None]):
        self.optimizer, self.index, self._exchange = optimizer, index, exchange
        self.stepped, self.loss = False, None

    def __getattr__(self, name: str) -> Any:  # reached only for what this class does not define
        return getattr(self.__dict__["optimizer"], name)

    def run(self, precision_plugin, model, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """Lightning's optimizer step on this worker; ``stepped`` says whether the plugin called ``step()``."""
        self.stepped, self.loss = False, None

        def compute() -> Any:
            self.loss = closure()
            return self.loss

        return precision_plugin.optimizer_step(self, model=model, closure=compute, **kwargs)

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        output = closure() if closure is not None else None  # compute (without a scaler: here)
        self.stepped = True
        self._exchange(self)  # push, pull: the pulled parameters are the step
        return output

    @property
    def has_gradient(self) -> bool:
        return any(p.grad is not None for group in self.optimizer.param_groups for p in group["params"])


class WorkerLimits:
    """On a worker: the server decides when training stops and steps the LR schedules; Lightning's own
    limits would count local steps, and its schedulers would step on local steps (OneCycleLR fails once a
    fast worker has taken more than its share). ``set_aside`` at the start, ``restore`` at the end. Where
    the workers count epochs (manual optimization), each keeps its epoch limits."""

    def __init__(self) -> None:
        self._aside: dict[str, Any] = {}

    def set_aside(self, strategy, trainer, workers_count_epochs: bool) -> None:
        fit_loop = trainer.fit_loop
        self._aside = {
            "max_epochs": fit_loop.max_epochs,
            "max_steps": fit_loop.epoch_loop.max_steps,
            "min_epochs": fit_loop.min_epochs,
            "min_steps": fit_loop.epoch_loop.min_steps,
        }
        fit_loop.epoch_loop.max_steps, fit_loop.epoch_loop.min_steps = -1, 0  # the server's stop is obeyed at once
        if not workers_count_epochs:
            fit_loop.max_epochs, fit_loop.min_epochs = -1, 0
        if strategy.lightning_module.automatic_optimization:  # manual optimization steps its schedulers itself
            self._aside["lr_scheduler_configs"], strategy.lr_scheduler_configs = strategy.lr_scheduler_configs, []
        # ModelCheckpoint saves the run's checkpoints on the server; on a worker it would record files
        # that were never written (only rank 0 writes)
        self._aside["callbacks"] = trainer.callbacks
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]

    def restore(self, strategy, trainer) -> None:
        aside, fit_loop = self._aside, trainer.fit_loop
        fit_loop.max_epochs, fit_loop.epoch_loop.max_steps = aside["max_epochs"], aside["max_steps"]
        fit_loop.min_epochs, fit_loop.epoch_loop.min_steps = aside["min_epochs"], aside["min_steps"]
        if "lr_scheduler_configs" in aside:
            strategy.lr_scheduler_configs = aside["lr_scheduler_configs"]
        trainer.callbacks = aside["callbacks"]
        self._aside = {}


@contextmanager
def run_wide_epoch(trainer, workers: int) -> Iterator[None]:
    """While ``configure_optimizers`` runs, ``trainer.num_training_batches`` is the run's epoch (every
    worker's shard, in whole steps), so ``trainer.estimated_stepping_batches`` is the number of server
    steps the run takes and a schedule sized with it ends with the run instead of failing
    (OneCycleLR) or starting over. Lightning loads the training data for that estimate on demand:
    the widening follows the loading, and the loader's own length is restored afterwards."""
    fit_loop = trainer.fit_loop
    own = {"max_batches": fit_loop.max_batches, "widened": False}

    def widen() -> None:
        if own["widened"]:
            return
        own.update(max_batches=fit_loop.max_batches, widened=True)
        if math.isfinite(fit_loop.max_batches) and fit_loop.max_batches > 0:
            accumulate = trainer.accumulate_grad_batches
            fit_loop.max_batches = workers * math.ceil(fit_loop.max_batches / accumulate) * accumulate

    load = fit_loop.setup_data

    def setup_data() -> None:
        load()
        widen()

    if trainer.train_dataloader is not None:
        widen()
    fit_loop.setup_data = setup_data
    try:
        yield
    finally:
        del fit_loop.setup_data  # the loop's own method again
        fit_loop.max_batches = own["max_batches"]
