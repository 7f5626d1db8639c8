"""Asynchronous stale-gradient training with bounded staleness (``--strategy async``).

Rank 0 is a dedicated parameter server: it holds the authoritative parameters and the optimizer
the LightningModule configures, and applies every gradient as it arrives. Every other rank is a
worker that trains on its own shard; its optimizer step is "compute, push, pull": compute a
gradient on its batch (or its ``accumulate_grad_batches`` batches), push it tagged with the
parameter version it came from, pull the latest parameters (waiting only if it would break the
staleness bound ``--staleness``), and continue from them. No worker waits for another one.
Lightning drives a worker's step as with any strategy, through the precision plugin
(``PushPullOptimizer``); the wire protocol is ``lightning_xd.parallel.parameter_server``.

The global step is the number of server steps, an epoch one pass of every worker over its shard
(``lightning_xd.parallel.async_run``); the server alone steps the LR schedulers, logs the loss,
staleness and update rate, and saves checkpoints (every epoch and at the end, resumable with
``trainer.fit(ckpt_path=...)``), driving Lightning's ``ModelCheckpoint`` through its own hooks.
While training runs Lightning's collectives are local: validation runs after training, on the
server's parameters over all ranks, and what needs metrics while training is refused at set-up. A
worker that stops on its own (``should_stop``, ``Timer``) stops the run. Under manual optimization
each worker runs its own ``max_epochs`` and the run ends when the last has finished. World size 1 is
plain local training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_xd.errors import UserError
from lightning_xd.fault_tolerance.fault_tolerant_checkpoint import FaultTolerantCheckpoint
from lightning_xd.launch.registry import STRATEGIES
from lightning_xd.mpi_strategy import MPIStrategy
from lightning_xd.parallel.async_run import (
    check_async_settings,
    check_fit,
    log_staleness_histogram,
    log_training,
    server_summary,
    share_server_state,
    show_run_progress,
    step_lr_schedulers,
)
from lightning_xd.parallel.async_worker import PushPullOptimizer, WorkerLimits, run_wide_epoch
from lightning_xd.parallel.parameter_server import SERVER, Gradient, ParameterServer, ParameterSet, WorkerClient


@STRATEGIES.register("async")
class AsyncStaleGradientStrategy(MPIStrategy):
    """Parameter server on rank 0, workers on the other ranks, staleness bounded by ``staleness``."""

    saves_own_checkpoints = True  # the server writes them; workers' epoch ends are not the run's
    is_synchronous = False

    def __init__(self, staleness: int = 4, delay_compensation: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.check_settings(self.comm.size, staleness)
        self.max_staleness, self.delay_compensation = staleness, delay_compensation
        self.server: ParameterServer | None = None
        self.client: WorkerClient | None = None
        self.version = 0  # gradients applied by the server; restored from a checkpoint to resume
        self.steps = 0  # server steps (applied or skipped): the run's global step
        self._training = False  # between on_train_start and on_train_end: no collectives
        self._limit_val_batches: Any = None
        self._push_pulls: list[PushPullOptimizer] = []
        self._worker_limits = WorkerLimits()
        self._summary: dict[str, Any] = {}

    @staticmethod
    def check_settings(nprocs: int, staleness: int = 4, model: Any | None = None) -> None:
        """Checked before any process starts (with the model), and again by every rank."""
        check_async_settings(nprocs, staleness, model)

    # ---- who does what --------------------------------------------------------------------
    @property
    def is_parallel(self) -> bool:
        return self.comm.size > 1

    @property
    def is_server(self) -> bool:
        return self.is_parallel and self.global_rank == SERVER

    def ranks_train_apart(self) -> bool:
        """While training runs, workers and server go at their own pace: collectives are local."""
        return self._training

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Training data is split over the workers; evaluation data over every rank."""
        fitting = self.lightning_module is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if fitting and self.is_parallel:
            return {"num_replicas": self.comm.size - 1, "rank": max(0, self.global_rank - 1)}
        return {"num_replicas": self.comm.size, "rank": self.global_rank}

    # ---- set-up -------------------------------------------------------------------------
    @override
    def setup(self, trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self._layer_sync is not None and self.is_parallel and fitting:
            raise UserError(
                "Trainer(sync_batchnorm=True) needs every rank in the same forward pass, but async "
                "workers run at their own pace: leave sync_batchnorm off or use the mpi strategy"
            )
        super().setup(trainer)  # broadcast rank 0's parameters; optimizers everywhere
        if not fitting or not self.is_parallel:
            return
        # Every rank decides alike from the same settings, after the same collectives: all of them stop here.
        check_fit(trainer, self.lightning_module, self.lr_scheduler_configs)
        # Validation would synchronise the workers every epoch: it runs after training instead.
        self._limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0

    @override
    def setup_optimizers(self, trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.is_parallel:
            with run_wide_epoch(trainer, workers=self.comm.size - 1):
                super().setup_optimizers(trainer)
        else:
            super().setup_optimizers(trainer)

    # ---- training: the server serves, the workers push and pull ---------------------------
    @override
    def on_train_start(self) -> None:
        if not self.is_parallel:
            return
        trainer = self.lightning_module.trainer
        if not math.isfinite(trainer.num_training_batches) and not (trainer.max_steps and trainer.max_steps > 0):
            raise UserError(
                "the training data has no length, so the async strategy cannot count epochs; give --max-steps"
            )
        self._training = True
        params = ParameterSet(self.lightning_module, self.optimizers)
        if self.is_server:
            self._serve(trainer, params)
            trainer.should_stop = True  # the server trains no batch itself
            return
        self._worker_limits.set_aside(self, trainer, self._workers_count_epochs)
        self._push_pulls = [PushPullOptimizer(opt, i, self._exchange) for i, opt in enumerate(self.optimizers)]
        self.client = WorkerClient(self.comm, params)
        steps_per_epoch = trainer.num_training_batches
        counted = math.isfinite(steps_per_epoch) and not self._workers_count_epochs
        if not self.client.hello(math.ceil(steps_per_epoch / trainer.accumulate_grad_batches) if counted else 0):
            trainer.should_stop = True

    @property
    def _workers_count_epochs(self) -> bool:
        """Under manual optimization a batch makes as many optimizer steps as the module asks for, so the
        server cannot count an epoch in steps: each worker runs its own epochs and says when it is done."""
        return not self.lightning_module.automatic_optimization

    def _serve(self, trainer, params: ParameterSet) -> None:
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs

        def limit(steps_per_epoch: int) -> int:
            limits = [max_steps] if max_steps and max_steps > 0 else []
            if max_epochs is not None and max_epochs > 0 and steps_per_epoch > 0:
                limits.append(max_epochs * steps_per_epoch)
            return max(self.steps, min(limits, default=math.inf))  # inf: until the workers finish their epochs

        self.server = ParameterServer(
            self.comm,
            params,
            self.optimizers,
            self.max_staleness,
            self.delay_compensation,
            version=self.version,
            steps=self.steps,
            after_step=self._after_step,
        )
        self.server.serve(limit)
        self.version, self.steps = self.server.version, self.server.steps

    def _after_step(self, server: ParameterServer, gradient: Gradient) -> None:
        """Server side, after each step (applied or skipped), in Lightning's order: LR schedules, logs,
        checkpoints."""
        trainer = self.lightning_module.trainer
        self.version, self.steps = server.version, server.steps  # what checkpoints saved now record
        epoch_end = bool(server.steps_per_epoch) and server.steps % server.steps_per_epoch == 0
        epochs = server.steps // server.steps_per_epoch if server.steps_per_epoch else 0
        if self.lightning_module.automatic_optimization:  # as Lightning: manual optimization steps its own
            step_lr_schedulers(trainer, self.lr_scheduler_configs, server.steps, epochs if epoch_end else None)
        log_training(trainer, server)
        self._save_checkpoints(trainer, server.steps, epochs, epoch_end)

    def _save_checkpoints(self, trainer, steps: int, epochs: int, epoch_end: bool) -> None:
        """Lightning's ModelCheckpoint through its own hooks, seeing the run's step and epoch, then at an
        epoch end the fault-tolerant checkpoint."""
        module = self.lightning_module
        show_run_progress(trainer, steps, epochs, epoch_ending=epoch_end)
        model_checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        for callback in model_checkpoints:
            callback.on_train_batch_end(trainer, module, None, None, steps - 1)
        if epoch_end:
            for callback in model_checkpoints:
                callback.on_train_epoch_end(trainer, module)
            show_run_progress(trainer, steps, epochs)
            self.save_server_checkpoint(trainer, "epoch")

    # ---- the worker's step: compute, push, pull, step ---------------------------------------
    @override
    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        if self.client is None:  # world size 1, or not training
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        push_pull = self._push_pulls[self.optimizers.index(optimizer)]
        output = push_pull.run(self.precision_plugin, model or self.lightning_module, closure, **kwargs)
        if not push_pull.stepped:  # the precision plugin skipped the step (GradScaler: inf/nan; no loss)
            self._exchange(push_pull)
        return output

    def _exchange(self, push_pull: PushPullOptimizer) -> None:
        """Push this step's gradient (or "no gradient" when the step was skipped), pull the newest parameters."""
        client = self.client
        if client.stopped:  # a step after the server's stop (manual optimization): beyond the run's limit
            self.lightning_module.trainer.should_stop = True
            return
        if push_pull.stepped and push_pull.has_gradient:
            loss = push_pull.loss
            client.push(push_pull.index, float(loss) if isinstance(loss, torch.Tensor | float | int) else float("nan"))
        else:
            client.skip(push_pull.index)
        if not client.pull():  # pull: the newest parameters, or the order to stop
            self.lightning_module.trainer.should_stop = True

    # ---- the end: every rank takes the server's state, then evaluates ---------------------------
    @override
    def on_train_end(self) -> None:
        if not self.is_parallel or not self._training:
            return
        trainer = self.lightning_module.trainer
        self._say_goodbye(trainer)
        ParameterSet(self.lightning_module, self.optimizers).share(lambda t: self.comm.broadcast(t, root=SERVER))
        self._agree_on_counts(trainer)
        if self.is_server:
            self._summary = server_summary(self.server, self.max_staleness)
            log_staleness_histogram(trainer, self.server, self.max_staleness)
            self.save_server_checkpoint(trainer, "end")
        else:
            self._worker_limits.restore(self, trainer)
        share_server_state(self.comm, trainer, self.optimizers, self.lr_scheduler_configs)
        self.client, self._push_pulls, self._training = None, [], False
        trainer.limit_val_batches = self._limit_val_batches

    def _say_goodbye(self, trainer) -> None:
        """A worker still in the run tells the server why it leaves."""
        if self.client is None or self.client.stopped:
            return
        if self._workers_count_epochs and trainer.max_epochs and trainer.current_epoch >= trainer.max_epochs:
            self.client.finish(trainer.current_epoch)  # its epochs are done; the others go on
        else:
            self.client.leave()  # stopped on its own (Timer, should_stop): the run stops as one

    def _agree_on_counts(self, trainer) -> None:
        """Every rank's counters show the server's steps, version and epochs of the run."""
        epochs = 0
        if self.is_server:
            server = self.server
            epochs = self.steps // server.steps_per_epoch if server.steps_per_epoch else server.epochs_finished
        counts = self.comm.broadcast(torch.tensor([self.version, self.steps, epochs]), root=SERVER)
        self.version, self.steps = int(counts[0]), int(counts[1])
        show_run_progress(trainer, self.steps, int(counts[2]))

    def summary_metrics(self) -> dict[str, Any]:
        """Figures for metrics.json (on rank 0, the server)."""
        return dict(self._summary)

    # ---- checkpoints: the server's parameters, optimizer state and version ---------------
    def save_server_checkpoint(self, trainer, kind: str) -> None:
        """Written by the server alone (barriers are local while training runs)."""
        checkpoints = trainer.checkpoint_callback
        if not isinstance(checkpoints, FaultTolerantCheckpoint) or trainer.fast_dev_run:
            return
        checkpoints._kind = kind
        trainer.save_checkpoint(checkpoints.store.folder / f"step-{self.steps:09d}.ckpt")

    @override
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        checkpoint["async_server"] = {"version": self.version, "steps": self.steps, "max_staleness": self.max_staleness}
        checkpoint["global_step"] = self.steps
        if self.server is not None:
            checkpoint["epoch"] = self.steps // max(1, self.server.steps_per_epoch)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = checkpoint.get("async_server", {})
        self.version = int(saved.get("version", 0))
        self.steps = int(saved.get("steps", self.version))
        return checkpoint
