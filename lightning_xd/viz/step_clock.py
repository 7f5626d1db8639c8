"""Where each training step's wall-clock time goes: computing, waiting for data, waiting for peers.

A step's interval runs from the end of the previous step (or the start of training or of the epoch,
the end of a validation run or of the dashboard's drawing: neither is a step's time) to the end of
this one, so the time spent getting the batch counts. Its wall-clock rate is the batch's samples
over that interval: in a synchronous job every process takes every step together, so every process
shows about the same rate, and the split below says where the time went.

- waiting for data: from the previous step's end to this step's start, less the MPI waits in that
  gap: the loader fetching the batch (a paced stream's sleep until its readings arrive), and
  whatever other callbacks do after a step (a checkpoint save);
- waiting for peers: every wait on the other processes in the interval, read from the strategy's
  cumulative counter (``StrategyContract.peer_wait_seconds``: our MPI strategies count every blocking
  MPI call): the gradient allreduce until the slowest process arrives, the buffer broadcast, the
  in-job recovery's agreement, an async worker's wait for the server;
- computing: the rest (forward, backward, optimizer step, hooks). A strategy that does not count its
  waits (Lightning's DDP) has them here; with one process there are none.

So a straggler shows as its peers waiting for it, and a starved stream as every process waiting for
data (and the one whose data came first waiting for the others).
"""

from __future__ import annotations

import time

from lightning_xd.contract import declared


def peer_waits_counted(trainer) -> bool:
    """Whether the time spent waiting for peers is told apart from computing in this job."""
    return trainer.world_size == 1 or declared(trainer.strategy).peer_wait_seconds() is not None


class StepClock:
    """One process's clock of its training steps: ``restart``, then ``step_started`` and ``step_ended``
    around each step."""

    def __init__(self) -> None:
        self._mark: tuple[float, float] | None = None  # (time, seconds waited) at the previous step's end
        self._started: tuple[float, float] = (0.0, 0.0)

    @staticmethod
    def _now(trainer) -> tuple[float, float]:
        waited = declared(trainer.strategy).peer_wait_seconds()
        return time.perf_counter(), waited or 0.0

    def restart(self, trainer) -> None:
        """The next step's interval starts now (training or an epoch starts, a validation run or the
        dashboard's drawing ended)."""
        self._mark = self._now(trainer)

    def step_started(self, trainer) -> None:
        self._started = self._now(trainer)
        if self._mark is None:
            self._mark = self._started

    def step_ended(self, trainer, samples: int) -> dict[str, float]:
        """This step's wall-clock rate (samples/s) and its time split (ms): ``compute_ms``, ``data_ms``
        and, where counted, ``peers_ms``."""
        ended = self._now(trainer)
        (marked, waited_before), (started, waited_at_start) = self._mark, self._started
        self._mark = ended
        interval = max(ended[0] - marked, 1e-9)
        peers = ended[1] - waited_before
        data = max(0.0, started - marked - (waited_at_start - waited_before))
        split = {"samples_per_s": samples / interval, "data_ms": 1000 * data}
        split["compute_ms"] = 1000 * max(0.0, interval - data - peers)
        if peer_waits_counted(trainer):
            split["peers_ms"] = 1000 * peers
        return split
