"""Asynchronous stale-gradient training with bounded staleness (``--strategy async``).

Rank 0 is a dedicated parameter server: it holds the authoritative parameters and the optimizer
the LightningModule configures, and applies every gradient as it arrives. Every other rank is a
worker that trains on its own shard; its optimizer step is "compute, push, pull, step": compute a
gradient on its batch (or its ``accumulate_grad_batches`` batches), push it tagged with the
parameter version it came from, pull the latest parameters (waiting only if it would break the
staleness bound ``--staleness``), and continue from them. No worker waits for another one: there
is no barrier per step.

On a worker Lightning drives the step as with any strategy, through the precision plugin, with the
real optimizer behind a stand-in whose only difference is its ``step()`` (``_PushPull``): the hooks
and gradient clipping run and the GradScaler unscales before the push, so the server receives the
gradient a single process would have applied. A step the precision plugin skips (inf/nan gradients
under ``16-mixed``, no loss) is pushed as "no gradient" (see ``lightning_xd.parallel.parameter_server``).

The global step is the number of server steps (pushes); ``--max-steps`` and ``--max-epochs`` count
those (an epoch = one pass of every worker over its shard), and so does
``trainer.estimated_stepping_batches`` while the optimizers are configured, so a schedule sized
with it (OneCycleLR) ends with the run. The server alone steps the LR schedulers (per step, or per
epoch of the run) with Lightning's ``lr_scheduler_step`` hook. While training runs, logging stays
local to each process (a collective would make fast workers wait for slow ones); the server logs
the loss, staleness and update rate. Validation does not run during training: at the end every
rank receives the server's parameters, optimizer and scheduler state, and validation and test run
on them over all ranks, so their metrics cover the whole sets. What needs metrics while training
(``EarlyStopping``, ``ModelCheckpoint(monitor=...)``, ``ReduceLROnPlateau``, ``val_check_interval``)
is refused at set-up on every rank with one line. The server saves a checkpoint (parameters,
optimizer state, version) every epoch and at the end, and drives Lightning's ``ModelCheckpoint``
(without a monitor) through its own hooks, with ``trainer.global_step`` and ``current_epoch``
showing the run's progress; every rank ends knowing the same checkpoint paths. A run resumes from
them with ``trainer.fit(ckpt_path=...)``. A worker that stops on its own (``trainer.should_stop``,
Lightning's ``Timer``) stops the run. Under manual optimization a batch makes as many steps as the
module asks for, so each worker runs its own ``max_epochs`` over its shard and the run ends when the
last has finished (``--max-steps`` still counts server steps). A parameter no step reached keeps no
gradient on the server too, and BatchNorm's batch counter counts every worker's batches. World size 1
is plain local training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_xd.errors import UserError
from lightning_xd.fault_tolerance.fault_tolerant_checkpoint import FaultTolerantCheckpoint
from lightning_xd.launch.registry import STRATEGIES
from lightning_xd.parallel.parameter_server import SERVER, Gradient, ParameterServer, ParameterSet, WorkerClient
from lightning_xd.strategies.mpi import MPIAllReduceStrategy


class _PushPull:
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

    def __init__(self, optimizer: torch.optim.Optimizer, index: int, exchange: Callable[[_PushPull], None]):
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


def needs_metrics_during_training(
    callbacks: Iterable[Any],
    lr_scheduler_configs: Iterable[Any] = (),
    val_check_interval: Any = 1.0,
    time_interval: Any = None,
) -> list[str]:
    """What asks for validation or for logged metrics while training runs, named as the user wrote it."""
    found = []
    for callback in callbacks:
        if isinstance(callback, EarlyStopping):
            found.append(f"EarlyStopping(monitor={callback.monitor!r})")
        elif isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
            found.append(f"ModelCheckpoint(monitor={callback.monitor!r})")
    for config in lr_scheduler_configs:
        if config.reduce_on_plateau:
            found.append(f"a ReduceLROnPlateau scheduler (monitor={config.monitor!r})")
    if time_interval is not None or isinstance(val_check_interval, int) or val_check_interval != 1.0:
        found.append(f"val_check_interval={val_check_interval!r}")
    return found


def show_run_progress(trainer, steps: int, epochs: int, epoch_ending: bool = False) -> None:
    """Lightning's counters (``trainer.global_step``, ``trainer.current_epoch``, what checkpoints record)
    show the run's progress: server steps, and epochs of the run. ``epoch_ending``: the counters as
    Lightning has them during ``on_train_epoch_end``, the last epoch processed but not yet completed."""
    loop = trainer.fit_loop
    for progress in (
        loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step,
        loop.epoch_loop.manual_optimization.optim_step_progress,
    ):
        for tracker in (progress.total, progress.current):
            tracker.ready = tracker.completed = steps
    for tracker in (loop.epoch_progress.total, loop.epoch_progress.current):
        tracker.ready = tracker.started = tracker.processed = epochs
        tracker.completed = epochs - 1 if epoch_ending else epochs


def refuse(found: list[str]) -> None:
    if found:
        raise UserError(
            f"{found[0]} needs validation or logged metrics during training, but the async strategy "
            "validates only after training (workers log locally, the server sees no metric); remove "
            "it or use --strategy mpi"
        )


@STRATEGIES.register("async")
class AsyncStaleGradientStrategy(MPIAllReduceStrategy):
    """Parameter server on rank 0, workers on the other ranks, staleness bounded by ``staleness``."""

    strategy_name = "async"
    supports_ulfm = False  # a lost worker or server ends the job; the supervisor restarts it

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
        self._push_pulls: list[_PushPull] = []
        self._set_aside: dict[str, Any] = {}  # a worker's loop limits and schedulers while the server decides
        self._summary: dict[str, Any] = {}

    @staticmethod
    def check_settings(nprocs: int, staleness: int = 4, model: Any | None = None) -> None:
        """Checked before any process starts (with the model), and again by every rank."""
        if staleness < 0:
            raise UserError(f"--staleness must be >= 0, got {staleness}")
        if model is not None and nprocs > 1:
            try:
                callbacks = model.configure_callbacks()
            except RuntimeError:  # it wants a Trainer: set-up checks the callbacks again on every rank
                callbacks = []
            refuse(needs_metrics_during_training(callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]))

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
        if self._layer_sync is not None and self.is_parallel and trainer.state.fn == TrainerFn.FITTING:
            raise UserError(
                "Trainer(sync_batchnorm=True) needs every rank in the same forward pass, but async "
                "workers run at their own pace: leave sync_batchnorm off or use the mpi strategy"
            )
        super().setup(trainer)  # broadcast rank 0's parameters; optimizers everywhere
        if trainer.state.fn != TrainerFn.FITTING or not self.is_parallel:
            return
        # Every rank decides alike from the same settings, after the same collectives: all of them stop here.
        self._check_fit(trainer)
        # Validation would synchronise the workers every epoch: it runs after training instead.
        self._limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0

    def _check_fit(self, trainer) -> None:
        validates = trainer.limit_val_batches != 0 and is_overridden("validation_step", self.lightning_module)
        refuse(
            needs_metrics_during_training(
                trainer.callbacks,
                self.lr_scheduler_configs,
                trainer.val_check_interval if validates else 1.0,
                getattr(trainer, "_val_check_time_interval", None) if validates else None,
            )
        )
        finetuning = [type(c).__name__ for c in trainer.callbacks if isinstance(c, BaseFinetuning)]
        if finetuning:
            raise UserError(
                f"{finetuning[0]} changes the optimizer's parameter groups at each worker's own epoch, "
                "which the async server's optimizer cannot follow; remove it or use --strategy mpi"
            )
        if not (trainer.max_steps and trainer.max_steps > 0) and not (trainer.max_epochs and trainer.max_epochs > 0):
            raise UserError("the async strategy needs --max-steps or --max-epochs (its server counts them)")

    def setup_optimizers(self, trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.is_parallel:
            with self._run_wide_epoch(trainer):
                super().setup_optimizers(trainer)
        else:
            super().setup_optimizers(trainer)

    @contextmanager
    def _run_wide_epoch(self, trainer) -> Iterator[None]:
        """While ``configure_optimizers`` runs, ``trainer.num_training_batches`` is the run's epoch (every
        worker's shard, in whole steps), so ``trainer.estimated_stepping_batches`` is the number of server
        steps the run takes and a schedule sized with it ends with the run instead of failing
        (OneCycleLR) or starting over. Lightning loads the training data for that estimate on demand:
        the widening follows the loading, and the loader's own length is restored afterwards."""
        fit_loop, workers = trainer.fit_loop, self.comm.size - 1
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

    # ---- training: the server serves, the workers push and pull ---------------------------
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
        self._leave_decisions_to_the_server(trainer)
        self._push_pulls = [_PushPull(opt, i, self._exchange) for i, opt in enumerate(self.optimizers)]
        self.client = WorkerClient(self.comm, params)
        steps_per_epoch = trainer.num_training_batches
        steps_per_epoch = (
            math.ceil(steps_per_epoch / trainer.accumulate_grad_batches)
            if math.isfinite(steps_per_epoch) and not self._workers_count_epochs
            else 0
        )
        if not self.client.hello(steps_per_epoch):
            trainer.should_stop = True

    @property
    def _workers_count_epochs(self) -> bool:
        """Under manual optimization a batch makes as many optimizer steps as the module asks for, so the
        server cannot count an epoch in steps: each worker runs its own epochs and says when it is done."""
        return not self.lightning_module.automatic_optimization

    def _leave_decisions_to_the_server(self, trainer) -> None:
        """On a worker: the server decides when training stops and steps the LR schedules; Lightning's own
        limits would count local steps, and its schedulers would step on local steps (OneCycleLR fails
        once a fast worker has taken more than its share). Restored when training ends. Where the workers
        count epochs (manual optimization), each keeps its epoch limits."""
        fit_loop = trainer.fit_loop
        self._set_aside = {
            "max_epochs": fit_loop.max_epochs,
            "max_steps": fit_loop.epoch_loop.max_steps,
            "min_epochs": fit_loop.min_epochs,
            "min_steps": fit_loop.epoch_loop.min_steps,
        }
        fit_loop.epoch_loop.max_steps, fit_loop.epoch_loop.min_steps = -1, 0  # the server's stop is obeyed at once
        if not self._workers_count_epochs:
            fit_loop.max_epochs, fit_loop.min_epochs = -1, 0
        if self.lightning_module.automatic_optimization:  # manual optimization steps its schedulers itself
            self._set_aside["lr_scheduler_configs"], self.lr_scheduler_configs = self.lr_scheduler_configs, []
        # ModelCheckpoint saves the run's checkpoints on the server; on a worker it would record files
        # that were never written (only rank 0 writes)
        self._set_aside["callbacks"] = trainer.callbacks
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]

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
            self._step_lr_schedulers(trainer, server.steps, epochs if epoch_end else None)
        self._log_training(trainer, server)
        self._save_checkpoints(trainer, server.steps, epochs, epoch_end)

    def _step_lr_schedulers(self, trainer, steps: int, epochs_ended: int | None) -> None:
        """Per server step, or per epoch of the run, through the module's ``lr_scheduler_step`` hook."""
        for config in self.lr_scheduler_configs:
            due = steps if config.interval == "step" else epochs_ended
            if due is not None and due % config.frequency == 0:
                call._call_lightning_module_hook(trainer, "lr_scheduler_step", config.scheduler, None)

    def _log_training(self, trainer, server: ParameterServer) -> None:
        recent = server.stats.staleness[-trainer.log_every_n_steps :]
        if trainer.logger is None or server.steps % trainer.log_every_n_steps or not recent:
            return  # (a window of skipped steps only has nothing to log)
        losses = server.stats.losses[-trainer.log_every_n_steps :]
        trainer.logger.log_metrics(
            {
                "train/loss": sum(losses) / len(losses),
                "async/staleness_mean": sum(recent) / len(recent),
                "async/staleness_max": max(recent),
                "async/updates_per_s": server.stats.updates_per_s,
            },
            step=server.steps,
        )

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
    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        if self.client is None:  # world size 1, or not training
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        push_pull = self._push_pulls[self.optimizers.index(optimizer)]
        output = push_pull.run(self.precision_plugin, model or self.lightning_module, closure, **kwargs)
        if not push_pull.stepped:  # the precision plugin skipped the step (GradScaler: inf/nan; no loss)
            self._exchange(push_pull)
        return output

    def _exchange(self, push_pull: _PushPull) -> None:
        """Push this step's gradient (or "no gradient" when the step was skipped), pull the newest parameters."""
        client = self.client
        if client.stopped:  # a step after the server's stop (manual optimization): beyond the run's limit
            self.lightning_module.trainer.should_stop = True
            return
        if push_pull.stepped and push_pull.has_gradient:
            loss = push_pull.loss
            client.push(push_pull.index, float(loss) if isinstance(loss, (torch.Tensor, float, int)) else float("nan"))
        else:
            client.skip(push_pull.index)
        if not client.pull():  # pull: the newest parameters, or the order to stop
            self.lightning_module.trainer.should_stop = True

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
        if self.client is not None and not self.client.stopped:
            if self._workers_count_epochs and trainer.max_epochs and trainer.current_epoch >= trainer.max_epochs:
                self.client.finish(trainer.current_epoch)  # its epochs are done; the others go on
            else:
                self.client.leave()  # stopped on its own (Timer, should_stop): the run stops as one
        # every rank evaluates the server's parameters
        ParameterSet(self.lightning_module, self.optimizers).share(lambda t: self.comm.broadcast(t, root=SERVER))
        epochs = 0
        if self.is_server:
            server = self.server
            epochs = self.steps // server.steps_per_epoch if server.steps_per_epoch else server.epochs_finished
        counts = self.comm.broadcast(torch.tensor([self.version, self.steps, epochs]), root=SERVER)
        self.version, self.steps = int(counts[0]), int(counts[1])
        show_run_progress(trainer, self.steps, int(counts[2]))
        if self.is_server:
            self._summary = {f"async/{k}": v for k, v in self.server.stats.summary().items()}
            self._summary.update(
                {
                    "async/max_staleness_bound": self.max_staleness,
                    "global_step": self.steps,
                    "updates_per_s": self.server.stats.updates_per_s,
                    "epochs": self.steps / max(1, self.server.steps_per_epoch),
                }
            )
            self._log_histogram(trainer)
            self.save_server_checkpoint(trainer, "end")
        else:
            self._take_back_decisions(trainer)
        self._share_server_state(trainer)
        self.client, self._push_pulls, self._training = None, [], False
        trainer.limit_val_batches = self._limit_val_batches

    def _take_back_decisions(self, trainer) -> None:
        aside, fit_loop = self._set_aside, trainer.fit_loop
        fit_loop.max_epochs, fit_loop.epoch_loop.max_steps = aside["max_epochs"], aside["max_steps"]
        fit_loop.min_epochs, fit_loop.epoch_loop.min_steps = aside["min_epochs"], aside["min_steps"]
        if "lr_scheduler_configs" in aside:
            self.lr_scheduler_configs = aside["lr_scheduler_configs"]
        trainer.callbacks = aside["callbacks"]
        self._set_aside = {}

    def _share_server_state(self, trainer) -> None:
        """Every rank ends with the server's optimizer, LR-scheduler and ModelCheckpoint state (the best and
        last checkpoint paths), as with the parameters."""
        model_checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        states = self.comm.broadcast_object(
            (
                [o.state_dict() for o in self.optimizers],
                [c.scheduler.state_dict() for c in self.lr_scheduler_configs],
                [c.state_dict() for c in model_checkpoints],
            )
            if self.is_server
            else None,
            root=SERVER,
        )
        if self.is_server:
            return
        for optimizer, saved in zip(self.optimizers, states[0]):
            optimizer.load_state_dict(saved)
        for config, saved in zip(self.lr_scheduler_configs, states[1]):
            config.scheduler.load_state_dict(saved)
        for callback, saved in zip(model_checkpoints, states[2]):
            callback.load_state_dict(saved)

    def _log_histogram(self, trainer) -> None:
        if isinstance(trainer.logger, TensorBoardLogger) and self.server.stats.staleness:
            trainer.logger.experiment.add_histogram(
                "async/staleness",
                torch.tensor(self.server.stats.staleness),
                global_step=self.steps,
                bins=torch.arange(-0.5, self.max_staleness + 1.0).numpy(),
            )

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
        trainer.save_checkpoint(checkpoints.store.folder / f"step-{self.steps:09d}.ckpt")

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        checkpoint["async_server"] = {"version": self.version, "steps": self.steps, "max_staleness": self.max_staleness}
        checkpoint["global_step"] = self.steps
        if self.server is not None:
            checkpoint["epoch"] = self.steps // max(1, self.server.steps_per_epoch)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)
        saved = checkpoint.get("async_server", {})
        self.version = int(saved.get("version", 0))
        self.steps = int(saved.get("steps", self.version))
        return checkpoint

    # ---- Lightning's collectives: local while workers run at their own pace ----------------
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        if self._training:
            return tensor if isinstance(tensor, torch.Tensor) else torch.tensor(tensor)
        return super().reduce(tensor, group, reduce_op)

    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False):
        if self._training:
            return tensor.unsqueeze(0)
        return super().all_gather(tensor, group, sync_grads)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj if self._training else super().broadcast(obj, src)

    def all_gather_object(self, obj: Any) -> list:
        return [obj] if self._training else super().all_gather_object(obj)

    def barrier(self, name: str | None = None) -> None:
        if not self._training:
            super().barrier(name)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision if self._training else super().reduce_boolean_decision(decision, all)

    def evaluate_with_first_replicas_buffers(self) -> None:
        if not self._training:  # after training every rank holds the server's parameters and buffers
            super().evaluate_with_first_replicas_buffers()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """No per-step broadcast of buffers: they travel with every push and pull."""
