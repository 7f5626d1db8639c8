"""Deliberate failures for testing recovery (``--inject-fault MODE:rank=R,step=S`` or ``...,batch=B``).

``step=S``: at the start of the first training batch of optimizer step S; ``batch=B``: at the start of
the B-th training batch of the run (counted from 0 over epochs: with gradient accumulation, any
micro-batch of a step).

Modes: ``kill`` (SIGKILL at that step), ``exit`` (leave without finalising MPI and without a
signal, the case MPI does not detect), ``hang`` (stop responding), ``during-checkpoint`` (SIGKILL
between writing a checkpoint and committing it). A fault fires in the first attempt only, so a
supervised restart is not killed again.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from lightning.pytorch import Callback

from lightning_xd.errors import UserError

MODES = ("kill", "exit", "hang", "during-checkpoint")


@dataclass(frozen=True)
class Fault:
    mode: str
    rank: int
    step: int | None = None
    batch: int | None = None

    def due(self, trainer) -> bool:
        if self.batch is not None:
            return trainer.fit_loop.total_batch_idx == self.batch
        return trainer.global_step == self.step


def parse_fault(spec: str) -> Fault:
    """ "kill:rank=1,step=20" -> Fault("kill", 1, 20)."""
    mode, _, rest = spec.partition(":")
    try:
        fields = dict(part.split("=") for part in rest.split(",") if part)
        if ("step" in fields) == ("batch" in fields):
            raise KeyError
        at = {k: int(fields[k]) for k in ("step", "batch") if k in fields}
        fault = Fault(mode, int(fields.get("rank", 0)), **at)
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"--inject-fault {spec!r} should look like kill:rank=1,step=20 (or batch=N instead of step=S)"
        ) from None
    if mode not in MODES:
        raise UserError(f"--inject-fault mode {mode!r} unknown; use one of {', '.join(MODES)}")
    return fault


def fail_now(mode: str) -> None:
    print(f"fault injection: {mode} on pid {os.getpid()} at {time.time():.3f}", flush=True)
    if mode in ("kill", "during-checkpoint"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "exit":
        os._exit(0)
    elif mode == "hang":
        while True:
            time.sleep(3600)


class FaultInjector(Callback):
    def __init__(self, fault: Fault):
        self.fault = fault
        self.armed = os.environ.get("XD_ATTEMPT", "0") == "0"

    def _mine(self, trainer) -> bool:
        return self.armed and trainer.global_rank == self.fault.rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._mine(trainer) and self.fault.mode != "during-checkpoint" and self.fault.due(trainer):
            fail_now(self.fault.mode)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.fault.mode != "during-checkpoint":
            return
        io = trainer.strategy.checkpoint_io
        io = getattr(io, "checkpoint_io", None) or io  # inside Lightning's AsyncCheckpointIO
        if hasattr(io, "before_commit"):
            io.before_commit = lambda step: (
                self._mine(trainer) and step >= (self.fault.step or 0) and fail_now(self.fault.mode)
            )
