"""How many threads a process of the job gives torch: the cores it may run on, shared fairly.

The launcher binds each rank to its own cores where it knows the host (``--map-by slot:PE=k``: k
cores each on a host of k x n cores); elsewhere ranks are left unbound. Either way a process asks
the kernel which cores it may run on (``os.sched_getaffinity``, which also reflects a Slurm task's
CPUs or a ``taskset``) and divides them among the processes of its host bound to the same cores:
a rank bound to 4 cores runs 4 threads, two unbound ranks on 8 cores run 4 each. Stacking
cpu_count / ranks threads on a rank bound to one core would make them take turns on that core.
A user's ``OMP_NUM_THREADS`` wins.
"""

from __future__ import annotations

import os


def allowed_cores() -> frozenset[int]:
    """The cores the kernel lets this process run on."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def threads_for(mine: frozenset[int], neighbours: list[frozenset[int]]) -> int:
    """Threads for a process allowed ``mine``, given every process of its host (itself included)."""
    sharing = sum(1 for cores in neighbours if cores == mine) or 1
    return max(1, len(mine) // sharing)


def share_cores(local_comm: object | None = None) -> int:
    """Set torch's threads for this process (``local_comm``: the processes on this host); returns them."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    mine = allowed_cores()
    neighbours = local_comm.allgather_object(mine) if local_comm is not None else [mine]
    torch.set_num_threads(threads_for(mine, neighbours))
    return torch.get_num_threads()
