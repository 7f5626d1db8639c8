"""Synchronous data parallelism over MPI (``--strategy mpi``): the MPI counterpart of Lightning's DDP.

Every rank holds the whole model and its own shard of the data. At set-up rank 0's parameters and
buffers are broadcast; during backward each gradient bucket starts a non-blocking allreduce as soon
as it is complete; after backward we wait for the buckets and average, so every rank takes the same
optimizer step (``AveragedGradients``). Lightning's reduce / all_gather / broadcast / barrier run over
MPI, so logged and torchmetrics epoch metrics cover the whole dataset on every rank (``MPIStrategy``).

With ``fault_tolerance="ulfm"`` (the default when train.py starts the job) a killed process is
survived inside the job: the others shrink the communicator, redo the interrupted step and go on
with the rest of the epoch re-sharded over them (``InJobRecovery``).

    Trainer(strategy="mpi")        or        python train.py --model cnn --strategy mpi --nprocs 2
"""

from __future__ import annotations

from typing import Any

from lightning_xd.fault_tolerance.recovery import InJobRecovery
from lightning_xd.launch.registry import STRATEGIES
from lightning_xd.mpi_strategy import MPIStrategy
from lightning_xd.parallel.averaged_gradients import AveragedGradients


@STRATEGIES.register("mpi")
class MPIAllReduceStrategy(InJobRecovery, AveragedGradients, MPIStrategy):
    """Bucketed, overlapped gradient allreduce, with in-job recovery."""

    def __init__(
        self,
        bucket_size_mb: float | None = None,
        find_unused_parameters: bool = False,
        overlap: bool = True,
        fault_tolerance: str | None = None,
        collective_timeout: float = 300.0,
        **kwargs: Any,
    ):
        super().__init__(
            bucket_size_mb=bucket_size_mb,
            find_unused_parameters=find_unused_parameters,
            overlap=overlap,
            fault_tolerance=fault_tolerance,
            collective_timeout=collective_timeout,
            **kwargs,
        )
