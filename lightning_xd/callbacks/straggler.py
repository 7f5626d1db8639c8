"""Slow one rank down on purpose (``--straggler-delay RANK:SECONDS``), to study stragglers."""

from __future__ import annotations

import time

from lightning.pytorch import Callback

from lightning_xd.errors import UserError


def parse_straggler(spec: str) -> tuple[int, float]:
    """ "2:0.05" -> (2, 0.05)."""
    try:
        rank, seconds = spec.split(":")
        return int(rank), float(seconds)
    except ValueError:
        raise UserError(f"--straggler-delay {spec!r} should be RANK:SECONDS, for example 2:0.05") from None


class StragglerDelay(Callback):
    """Sleeps after every training batch of one rank, so that rank's steps take longer."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds = rank, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank:
            time.sleep(self.seconds)
