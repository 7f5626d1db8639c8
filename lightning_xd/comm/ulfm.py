"""Surviving killed processes inside a running job: MPI's User-Level Failure Mitigation (ULFM).

Under ``mpirun --with-ft ulfm`` and with errors returned instead of fatal, a process that dies
makes the others' next collective fail with ``ERR_PROC_FAILED`` within about a second. Then
the survivors revoke the communicator (so every pending operation on it fails too, on every
survivor), agree on who is left and shrink it to a working communicator of the survivors.

Three traps: a collective can succeed on some survivors and fail on others, so after every
operation that matters the survivors *agree* (``Comm.Agree``, itself fault-tolerant) on whether
it succeeded everywhere, the ones that failed included, before anyone shrinks; a process that
hangs, or leaves without being reported, is never reported as failed, so the others would wait
forever: a watchdog ends the job when one MPI wait has lasted longer than ``timeout`` (waits
only: a long computation is not a hang), for the supervisor to restart it; and after a failure,
MPI_Finalize can wait forever for the lost process (Open MPI issue 11404, seen here once in ~20
runs), so a process that survived one ends without it (``leave_after_failure``).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lightning_xd.comm.communicator import Communicator, mpi, watched

HANG_EXIT_CODE = 75


class ProcessFailure(Exception):
    """A process of the communicator has failed (or the communicator was revoked because of one)."""


def available() -> bool:
    """True when the job was started with ULFM enabled (``mpirun --with-ft ulfm`` sets this for its ranks)."""
    return os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true", "yes")


def enable(comm: Communicator) -> None:
    """Return errors from MPI calls on ``comm`` (and communicators derived from it) instead of aborting."""
    comm.mpi.Set_errhandler(mpi().ERRORS_RETURN)


class Watchdog:
    """Ends the job when one MPI wait has lasted longer than ``timeout`` seconds.

    Installed as the comm layer's wait watcher (``comm.watch_waits``): every blocking MPI call and
    every wait for a non-blocking one registers while it waits. Waits may nest or overlap (a metric's
    gather inside a logging call); each is timed on its own, so the end of one never unwatches another.

    The process that hung is not waiting in MPI; it may not even end on the job's SIGTERM (Lightning
    catches it to stop at the next batch). Its own watchdog ends it when the process that launched it
    (mpirun's daemon) is gone: a rank never outlives its job.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._launcher = os.getppid()
        self._waiting: dict[int, tuple[float, str]] = {}  # token -> (since, what)
        self._tokens = itertools.count()
        thread = threading.Thread(target=self._watch, name="collective-watchdog", daemon=True)
        thread.start()

    @contextmanager
    def watching(self, what: str) -> Iterator[None]:
        token = next(self._tokens)
        self._waiting[token] = (time.monotonic(), what)
        try:
            yield
        finally:
            del self._waiting[token]

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            if os.getppid() != self._launcher:  # (its output went with it: nothing to print to)
                os._exit(HANG_EXIT_CODE)
            waits = list(self._waiting.values())
            if not waits:
                continue
            since, what = min(waits)
            if time.monotonic() - since > self.timeout:
                print(
                    f"error: {what} has waited over {self.timeout:.0f} s: a process is gone without being "
                    "reported or has hung; ending the job so that it can be restarted from its checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                end_the_job(HANG_EXIT_CODE)


def end_the_job(code: int) -> None:
    """End every process of the job, the hung one too (it is alive: exiting alone would leave it
    holding its host), through ``MPI_Abort``; should the abort itself hang, exit this process anyway."""
    threading.Timer(10.0, os._exit, (code,)).start()
    try:
        mpi().COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


@contextmanager
def detect() -> Iterator[None]:
    """Turn MPI's process-failure errors into ProcessFailure."""
    try:
        yield
    except Exception as err:
        if is_process_failure(err):
            raise ProcessFailure(str(err)) from None
        raise


def is_process_failure(err: Exception) -> bool:
    """Whether an MPI error says a process failed (or the communicator was revoked because one did)."""
    if "mpi4py.MPI" not in sys.modules:
        return False
    MPI = mpi()
    failures = {MPI.ERR_PROC_FAILED, MPI.ERR_REVOKED, getattr(MPI, "ERR_PROC_FAILED_PENDING", MPI.ERR_PROC_FAILED)}
    return isinstance(err, MPI.Exception) and err.Get_error_class() in failures


def agree(comm: Communicator, ok: bool = True) -> None:
    """Every surviving process of ``comm`` calls this at the same point, with whether its own part
    worked; raises ProcessFailure on every one of them unless every process got here with ``ok``."""
    with detect(), watched("an agreement"):
        everywhere = comm.mpi.Agree(int(ok))
    if not everywhere:
        raise ProcessFailure("a process could not complete the operation")


def shrink(comm: Communicator) -> tuple[Communicator, list[int]]:
    """The survivors' new communicator, and the ranks (in ``comm``) that were lost."""
    comm.mpi.Revoke()
    with watched("shrinking the communicator"):
        survivors = comm.mpi.Shrink()
    MPI = mpi()
    survivors.Set_errhandler(MPI.ERRORS_RETURN)
    lost_group = MPI.Group.Difference(comm.mpi.Get_group(), survivors.Get_group())
    lost = MPI.Group.Translate_ranks(lost_group, list(range(lost_group.Get_size())), comm.mpi.Get_group())
    return Communicator(survivors), [int(r) for r in lost]


def leave_after_failure(code: int = 0) -> None:
    """End this process without MPI_Finalize, once its work is written: after a process failure the
    finalize can hang on the lost process, and under ``--with-ft ulfm`` mpirun accepts the exit."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
