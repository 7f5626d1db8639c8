"""Asynchronous stale-gradient training with bounded staleness (``--strategy async``).

Rank 0 is a dedicated parameter server: it holds the authoritative parameters and the optimizer
the LightningModule configures, and applies every gradient as it arrives. Every other rank is a
worker that trains on its own shard; its optimizer step is "compute, push, pull, step": compute a
gradient on its batch, push it tagged with the parameter version it came from, pull the latest
parameters (waiting only if it would break the staleness bound ``--staleness``), and continue
from them. No worker waits for another one: there is no barrier per step.

The global step is the number of server updates; ``--max-steps`` and ``--max-epochs`` count those
(an epoch = one pass of every worker over its shard). While training runs, logging stays local
to each process (a collective would make fast workers wait for slow ones); the server logs the
loss, staleness and update rate. At the end every rank receives the server's parameters and
validation and test run on them over all ranks, so their metrics cover the whole sets. The server
saves a checkpoint (parameters, optimizer state, version) every epoch and at the end; a run
resumes from it with ``trainer.fit(ckpt_path=...)``. World size 1 is plain local training.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from lightning_xd.callbacks.fault_tolerant_checkpoint import FaultTolerantCheckpoint
from lightning_xd.errors import UserError
from lightning_xd.parameter_server import SERVER, Gradient, ParameterServer, ParameterSet, WorkerClient
from lightning_xd.registry import STRATEGIES
from strategies.mpi_allreduce import MPIAllReduceStrategy


class _PushPull:
    """Stands in for the optimizer on a worker: its step() is "compute, push, pull, step"."""

    def __init__(self, strategy: "AsyncStaleGradientStrategy", optimizer_index: int):
        self.strategy, self.optimizer_index = strategy, optimizer_index

    def step(self, closure):
        loss = closure()  # compute: forward and backward on this worker's batch (Lightning's hooks run)
        client = self.strategy.client
        client.push(self.optimizer_index, float(loss) if loss is not None else float("nan"))  # push
        if not client.pull():  # pull: the newest parameters, or the order to stop
            self.strategy.lightning_module.trainer.should_stop = True
        return loss  # step: the pulled parameters are already in the model


@STRATEGIES.register("async")
class AsyncStaleGradientStrategy(MPIAllReduceStrategy):
    """Parameter server on rank 0, workers on the other ranks, staleness bounded by ``staleness``."""

    strategy_name = "async"
    supports_ulfm = False  # a lost worker or server ends the job; the supervisor restarts it

    def __init__(self, staleness: int = 4, delay_compensation: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        if staleness < 0:
            raise UserError(f"--staleness must be >= 0, got {staleness}")
        self.max_staleness, self.delay_compensation = staleness, delay_compensation
        self.server: Optional[ParameterServer] = None
        self.client: Optional[WorkerClient] = None
        self.version = 0  # restored from a checkpoint to resume
        self._training = False  # between on_train_start and on_train_end: no collectives
        self._limit_val_batches: Any = None
        self._summary: dict[str, Any] = {}

    # ---- who does what --------------------------------------------------------------------
    @property
    def is_parallel(self) -> bool:
        return self.comm.size > 1

    @property
    def is_server(self) -> bool:
        return self.is_parallel and self.global_rank == SERVER

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Training data is split over the workers; evaluation data over every rank."""
        fitting = self.lightning_module is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if fitting and self.is_parallel:
            workers = self.comm.size - 1
            return {"num_replicas": workers, "rank": max(0, self.global_rank - 1)}
        return {"num_replicas": self.comm.size, "rank": self.global_rank}

    # ---- set-up -------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        super().setup(trainer)  # broadcast rank 0's parameters; optimizers everywhere
        if trainer.state.fn == TrainerFn.FITTING and self.is_parallel:
            # Validation would synchronise the workers every epoch: it runs after training instead.
            self._limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0

    def on_train_start(self) -> None:
        if not self.is_parallel:
            return
        trainer = self.lightning_module.trainer
        self._training = True
        params = ParameterSet(self.lightning_module, self.optimizers)
        if self.is_server:
            self._serve(trainer, params)
            trainer.should_stop = True  # the server trains no batch itself
            return
        # The server decides when training stops; Lightning's own limits would count local steps.
        trainer.fit_loop.max_epochs, trainer.fit_loop.epoch_loop.max_steps = -1, -1
        self.client = WorkerClient(self.comm, params)
        if not self.client.hello(int(trainer.num_training_batches)):
            trainer.should_stop = True

    def _serve(self, trainer, params: ParameterSet) -> None:
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs

        def limit(batches_per_epoch: int) -> int:
            limits = [max_steps] if max_steps and max_steps > 0 else []
            if max_epochs is not None and max_epochs > 0:
                limits.append(max_epochs * batches_per_epoch)
            if not limits:
                raise UserError("the async strategy needs --max-steps or --max-epochs")
            return max(self.version, min(limits))

        self.server = ParameterServer(self.comm, params, self.optimizers, self.max_staleness,
                                      self.delay_compensation, version=self.version,
                                      after_update=self._after_update)
        self.server.serve(limit)
        self.version = self.server.version

    def _after_update(self, server: ParameterServer, gradient: Gradient) -> None:
        """Server side, after each applied gradient: schedules, logs, checkpoints."""
        trainer = self.lightning_module.trainer
        epoch_end = server.batches_per_epoch and server.version % server.batches_per_epoch == 0
        for config in self.lr_scheduler_configs:
            due = server.version if config.interval == "step" else server.version // max(1, server.batches_per_epoch)
            if (config.interval == "step" or epoch_end) and due % config.frequency == 0 and \
                    not isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                config.scheduler.step()
        if trainer.logger is not None and server.version % trainer.log_every_n_steps == 0:
            recent = server.stats.staleness[-trainer.log_every_n_steps:]
            losses = server.stats.losses[-trainer.log_every_n_steps:]
            trainer.logger.log_metrics({"train/loss": sum(losses) / len(losses),
                                        "async/staleness_mean": sum(recent) / len(recent),
                                        "async/staleness_max": max(recent),
                                        "async/updates_per_s": server.stats.updates_per_s}, step=server.version)
        if epoch_end:
            self.version = server.version
            self.save_server_checkpoint(trainer, "epoch")

    # ---- the worker's step: compute, push, pull, step ---------------------------------------
    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        if self.client is None:  # world size 1, or nothing left to do
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        return self.precision_plugin.optimizer_step(_PushPull(self, self.optimizers.index(optimizer)),
                                                    model=model or self.lightning_module, closure=closure)

    def gradient_sync(self) -> None:
        """No gradient averaging: gradients go to the server as they are."""
        return None

    def metrics_can_sync(self) -> bool:
        return self.comm.size > 1 and not self._training

    # ---- the end ------------------------------------------------------------------------------
    def on_train_end(self) -> None:
        if not self.is_parallel or not self._training:
            return
        trainer = self.lightning_module.trainer
        state = ParameterSet(self.lightning_module, self.optimizers)
        flat = state.pack_state()
        self.comm.broadcast(flat, root=SERVER)  # every rank evaluates the server's parameters
        state.load_state(flat)
        self.version = int(self.comm.broadcast(torch.tensor([self.version]), root=SERVER))
        if self.is_server:
            self._summary = {f"async/{k}": v for k, v in self.server.stats.summary().items()}
            self._summary.update({"async/max_staleness_bound": self.max_staleness, "global_step": self.version,
                                  "updates_per_s": self.server.stats.updates_per_s,
                                  "epochs": self.version / max(1, self.server.batches_per_epoch)})
            self._log_histogram(trainer)
            self.save_server_checkpoint(trainer, "end")
        self.client, self._training = None, False
        trainer.limit_val_batches = self._limit_val_batches

    def _log_histogram(self, trainer) -> None:
        if isinstance(trainer.logger, TensorBoardLogger) and self.server.stats.staleness:
            trainer.logger.experiment.add_histogram(
                "async/staleness", torch.tensor(self.server.stats.staleness), global_step=self.version,
                bins=torch.arange(-0.5, self.max_staleness + 1.0).numpy())

    def summary_metrics(self) -> dict[str, Any]:
        """Figures for metrics.json (on rank 0, the server)."""
        return dict(self._summary)

    # ---- checkpoints: the server's parameters, optimizer state and version ---------------
    saves_own_checkpoints = True  # the server writes them; workers' epoch ends are not the run's

    def save_server_checkpoint(self, trainer, kind: str) -> None:
        """Written by the server alone (barriers are local while training runs)."""
        checkpoints = trainer.checkpoint_callback
        if not isinstance(checkpoints, FaultTolerantCheckpoint) or trainer.fast_dev_run:
            return
        checkpoints._kind = kind
        trainer.save_checkpoint(checkpoints.store.folder / f"step-{self.version:09d}.ckpt")

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        checkpoint["async_server"] = {"version": self.version, "max_staleness": self.max_staleness}
        checkpoint["global_step"] = self.version
        if self.server is not None:
            checkpoint["epoch"] = self.version // max(1, self.server.batches_per_epoch)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)
        self.version = int(checkpoint.get("async_server", {}).get("version", 0))
        return checkpoint

    # ---- Lightning's collectives: local while workers run at their own pace ----------------
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        if self._training:
            return tensor if isinstance(tensor, torch.Tensor) else torch.tensor(tensor)
        return super().reduce(tensor, group, reduce_op)

    def all_gather(self, tensor: torch.Tensor, group: Optional[Any] = None, sync_grads: bool = False):
        if self._training:
            return tensor.unsqueeze(0)
        return super().all_gather(tensor, group, sync_grads)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj if self._training else super().broadcast(obj, src)

    def all_gather_object(self, obj: Any) -> list:
        return [obj] if self._training else super().all_gather_object(obj)

    def barrier(self, name: Optional[str] = None) -> None:
        if not self._training:
            super().barrier(name)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision if self._training else super().reduce_boolean_decision(decision, all)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """No per-step broadcast of buffers: they travel with every push and pull."""
