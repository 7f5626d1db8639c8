"""Training runs inside one MPI job, built by train.py's own functions (``lightning_xd.launch.runner``).

A benchmark process builds one Trainer after another (one strategy, then the next), so a
comparison pays MPI and torch start-up once and every strategy runs on the same processes,
threads and data. Lightning's DDP (gloo) and our MPI strategies follow each other in one process:
the gloo process group, made by the first DDP run, stays for the next ones. Trainers are lean: no
logger, progress bar, model summary or validation while fitting, no checkpoints unless a
callback asks; a training step does what train.py's does and nothing else.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

import lightning_xd.datamodules  # noqa: F401  (registers the names)
import lightning_xd.models  # noqa: F401
import lightning_xd.strategies  # noqa: F401
from benchmarks import common
from lightning_xd.comm.communicator import world
from lightning_xd.launch import runner
from lightning_xd.launch.registry import MODELS

T = TypeVar("T")
_RELEASE_TAG = 4242


def quiet() -> None:
    """Lightning's advice and warnings, printed by every rank for every Trainer, would drown the figures."""
    runner.quiet()


_PLACED_ON = frozenset(os.sched_getaffinity(0))  # the cores mpirun bound this process to


def share_cores(alone: bool = False) -> int:
    """Threads for the next run, as train.py gives them (``lightning_xd.launch.cores``); returns them.

    ``alone``: this process runs by itself (``single`` while the others wait): it may use every core of
    the machine, as train.py's one process would, so it leaves the cores mpirun bound it to."""
    from lightning_xd.launch.cores import share_cores as share

    if alone:
        everything = set(range(os.cpu_count() or 1))
        os.sched_setaffinity(0, everything)
        torch.set_num_threads(len(everything))
        return torch.get_num_threads()
    os.sched_setaffinity(0, _PLACED_ON)
    return share(world().local())


@dataclass(frozen=True)
class Workload:
    """What every strategy of a comparison trains: one model on one dataset with the same settings."""

    model: str
    data: str
    settings: dict = field(default_factory=dict)  # data_dir, cache_dir, batch_size ...: flags as train.py takes them
    seed: int = 42

    @classmethod
    def of(cls, model: str, settings: dict, data: str | None = None) -> Workload:
        """The model on its own dataset (or ``data``), with the settings its constructors accept."""
        return cls(
            model, data or MODELS.get(model).defaults["data"], {k: v for k, v in settings.items() if v is not None}
        )

    def prepare(self) -> None:
        """Check, download and cache the data: once per host, before any rank reads it (every rank calls it)."""
        from lightning_xd.launch.registry import DATAMODULES

        runner.prepare_data_once_per_host(DATAMODULES.build(self.data, self.settings))

    def build(self, strategy: str, **strategy_settings: Any) -> tuple[Any, Any, Any]:
        """Datamodule, model and strategy as train.py builds them, from the same seed every time (the
        data prepared before, by ``prepare``: a rank that runs alone could not wait for the others)."""
        return runner.build_pieces(
            self.model, self.data, strategy, self.settings, self.seed, strategy_settings, prepare=False
        )


def trainer(strategy, max_steps: int = -1, callbacks: Sequence = (), plugins: Sequence = (), **overrides: Any):
    """A lean Trainer, placed as train.py places it (``overrides``: any Trainer argument,
    ``limit_val_batches=1.0`` to validate)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import Checkpoint

    options = dict(
        **runner.trainer_placement(strategy, plugins),
        max_epochs=-1,
        max_steps=max_steps,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tempfile.gettempdir(),
    )
    return Trainer(**{**options, **overrides})


def fit(
    workload: Workload,
    strategy: str,
    max_steps: int,
    callbacks: Sequence = (),
    strategy_settings: dict = None,
    **trainer_options: Any,
):
    """Build and fit; returns the trainer (its strategy and model with it)."""
    datamodule, model, built = workload.build(strategy, **(strategy_settings or {}))
    fitted = trainer(built, max_steps, callbacks, **trainer_options)
    with common.torch_distributed_left_as_found():
        fitted.fit(model, datamodule=datamodule)
    return fitted


def on_first_rank(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 alone (a one-process run) while the other ranks wait without taking a
    core (polling with sleeps, not MPI's busy wait); every rank returns rank 0's result."""
    comm = world()
    result = work() if comm.rank == 0 else None
    token = torch.zeros(1)
    if comm.rank == 0:
        for rank in range(1, comm.size):
            comm.send(token, rank, _RELEASE_TAG)
    else:
        comm.irecv(token, 0, _RELEASE_TAG).wait(yield_cpu=True)
    return comm.broadcast_object(result)
