"""The asynchronous run as Lightning sees it: what it refuses, the counters it shows, and the server's
side of Lightning's step (LR schedules, logs, the state every rank ends with).

Validation does not run while the workers train at their own pace, so what needs metrics while
training runs is refused at set-up. The global step is the number of server steps and an epoch is
one pass of every worker over its shard: ``show_run_progress`` puts those in Lightning's counters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_xd.comm.communicator import Communicator
from lightning_xd.errors import UserError
from lightning_xd.parallel.parameter_server import SERVER, ParameterServer


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


def refuse_metrics_during_training(found: list[str]) -> None:
    if found:
        raise UserError(
            f"{found[0]} needs validation or logged metrics during training, but the async strategy "
            "validates only after training (workers log locally, the server sees no metric); remove "
            "it or use --strategy mpi"
        )


def check_async_settings(nprocs: int, staleness: int, model: Any | None) -> None:
    """The strategy's settings, and (before any process starts) the callbacks the model configures."""
    if staleness < 0:
        raise UserError(f"--staleness must be >= 0, got {staleness}")
    if model is not None and nprocs > 1:
        try:
            callbacks = model.configure_callbacks()
        except RuntimeError:  # it wants a Trainer: set-up checks the callbacks again on every rank
            callbacks = []
        callbacks = callbacks if isinstance(callbacks, list | tuple) else [callbacks]
        refuse_metrics_during_training(needs_metrics_during_training(callbacks))


def check_fit(trainer, module, lr_scheduler_configs) -> None:
    """What the async run cannot train with, refused on every rank alike."""
    validates = trainer.limit_val_batches != 0 and is_overridden("validation_step", module)
    refuse_metrics_during_training(
        needs_metrics_during_training(
            trainer.callbacks,
            lr_scheduler_configs,
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


def step_lr_schedulers(trainer, lr_scheduler_configs, steps: int, epochs_ended: int | None) -> None:
    """Per server step, or per epoch of the run, through the module's ``lr_scheduler_step`` hook."""
    for config in lr_scheduler_configs:
        due = steps if config.interval == "step" else epochs_ended
        if due is not None and due % config.frequency == 0:
            call._call_lightning_module_hook(trainer, "lr_scheduler_step", config.scheduler, None)


def log_training(trainer, server: ParameterServer) -> None:
    """Every ``log_every_n_steps`` server steps: the loss, staleness and update rate."""
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


def server_summary(server: ParameterServer, bound: int) -> dict[str, Any]:
    """Figures for metrics.json, from the server's statistics."""
    return {
        **{f"async/{k}": v for k, v in server.stats.summary().items()},
        "async/max_staleness_bound": bound,
        "global_step": server.steps,
        "updates_per_s": server.stats.updates_per_s,
        "epochs": server.steps / max(1, server.steps_per_epoch),
    }


def log_staleness_histogram(trainer, server: ParameterServer, bound: int) -> None:
    if isinstance(trainer.logger, TensorBoardLogger) and server.stats.staleness:
        trainer.logger.experiment.add_histogram(
            "async/staleness",
            torch.tensor(server.stats.staleness),
            global_step=server.steps,
            bins=torch.arange(-0.5, bound + 1.0).numpy(),
        )


def share_server_state(comm: Communicator, trainer, optimizers: list, lr_scheduler_configs: list) -> None:
    """Every rank ends with the server's optimizer, LR-scheduler and ModelCheckpoint state (the best and
    last checkpoint paths), as with the parameters."""
    is_server = comm.rank == SERVER
    model_checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    states = comm.broadcast_object(
        (
            [o.state_dict() for o in optimizers],
            [c.scheduler.state_dict() for c in lr_scheduler_configs],
            [c.state_dict() for c in model_checkpoints],
        )
        if is_server
        else None,
        root=SERVER,
    )
    if is_server:
        return
    for optimizer, saved in zip(optimizers, states[0]):
        optimizer.load_state_dict(saved)
    for config, saved in zip(lr_scheduler_configs, states[1]):
        config.scheduler.load_state_dict(saved)
    for callback, saved in zip(model_checkpoints, states[2]):
        callback.load_state_dict(saved)
