"""Lightning's collective hooks (reduce, all_gather, broadcast, barrier) over a Communicator.

Without an initialised ``torch.distributed``, Lightning's defaults silently return the local
value, so ``self.log(..., sync_dist=True)`` and torchmetrics would report one rank's share of the
data. Every MPI strategy mixes this in and points ``self.comm`` at its communicator.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_xd.comm.communicator import Communicator


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of every rank's copy of our slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor, comm: Communicator) -> Tensor:
        ctx.comm = comm
        return comm.allgather(tensor.detach().contiguous())

    @staticmethod
    def backward(ctx, grad: Tensor):
        summed = ctx.comm.allreduce(grad.contiguous().clone(), "sum")
        return summed[ctx.comm.rank], None


def attach_metric_sync(
    module: nn.Module,
    comm: Communicator,
    available: Callable[[], bool],
    guard: Callable[[], AbstractContextManager] = nullcontext,
) -> None:
    """Make every torchmetrics Metric in ``module`` gather its state over ``comm`` on compute(),
    whenever ``available()`` says the ranks can meet in a collective; each gather runs inside
    ``guard()`` (a watchdog that turns a hang into a failure)."""
    from torchmetrics import Metric

    def gather(tensor: Tensor, group: Any = None) -> list[Tensor]:
        with guard():
            return comm.allgather_varying(tensor)

    for metric in module.modules():
        if isinstance(metric, Metric):
            metric.dist_sync_fn = gather
            metric.distributed_available_fn = available


def gather_objects(strategy: Any, obj: Any) -> list:
    """Every process's ``obj``, in rank order, whatever the strategy: ours gather over MPI
    (``MPICollectives``), Lightning's DDP over torch.distributed, one process has only its own."""
    if isinstance(strategy, MPICollectives):
        return strategy.all_gather_object(obj)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


class MPICollectives:
    """Lightning's collectives for a strategy whose ``replicas`` hold the ranks that log together (all of
    them, except in the hybrid strategy: the data-parallel group of a pipeline stage) and whose ``comm``
    holds every process: decisions, broadcasts and barriers are the whole job's. Each runs through the
    strategy's ``run_collective`` (which in-job recovery retries on the survivors); while the strategy's
    ``ranks_train_apart()`` holds they are local, as on one process."""

    comm: Communicator
    replicas: Communicator

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        """Reduce over the ranks. Accepts "mean"/"sum"/"max"/"min" and torch's ReduceOp (Lightning passes both)."""
        if not isinstance(tensor, Tensor):
            tensor = torch.tensor(tensor, device=self.root_device)
        if self.ranks_train_apart():
            return tensor
        return self.run_collective(
            lambda: self.replicas.allreduce(tensor.detach().clone(), reduce_op or "mean"), "reduce"
        )

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """A decision of the whole job (stop, save): every process, not only those that log together."""
        if self.ranks_train_apart():
            return decision
        votes = self.run_collective(
            lambda: int(self.comm.allreduce(torch.tensor([int(decision)]), "sum")), "a decision"
        )
        return votes == self.comm.size if all else votes > 0

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        """Stack every rank's ``tensor`` (same shape on each) along a new first dimension."""
        if self.ranks_train_apart():
            return tensor.unsqueeze(0)
        if sync_grads:
            return self.run_collective(lambda: _AllGatherWithGrad.apply(tensor, self.replicas), "all_gather")
        return self.run_collective(lambda: self.replicas.allgather(tensor.detach().contiguous()), "all_gather")

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """From process ``src`` of the whole job to all of them (Lightning's paths and decisions)."""
        if self.ranks_train_apart():
            return obj
        return self.run_collective(lambda: self.comm.broadcast_object(obj, root=src), "broadcast")

    def all_gather_object(self, obj: Any) -> list:
        """One object per process of the whole job, in rank order."""
        if self.ranks_train_apart():
            return [obj]
        return self.run_collective(lambda: self.comm.allgather_object(obj), "all_gather")

    @override
    def barrier(self, name: str | None = None) -> None:
        if not self.ranks_train_apart():
            self.run_collective(self.comm.barrier, f"barrier {name or ''}")
