"""Gradient averaging over a communicator in flat buckets, overlapped with backward.

Parameters are grouped, in reverse registration order (roughly the order backward produces
their gradients), into buckets of about ``bucket_size_mb``. An autograd hook counts the
gradients of each bucket as they arrive; when a bucket is complete its gradients are copied into
one flat buffer and a non-blocking allreduce starts, while backward goes on computing the
next ones. ``synchronize()`` waits for the buckets, averages and writes the gradients back.

Sparse gradients (``nn.Embedding(sparse=True)``) never enter a bucket: their indices and values
are gathered from every rank and summed, so they stay sparse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_xd.comm import Communicator, Handle
from lightning_xd.flat import FlatLayout


@dataclass(eq=False)
class _Bucket:
    params: list[nn.Parameter]
    layout: FlatLayout
    flat: Tensor
    ready: int = 0
    handle: Optional[Handle] = None


def _sparse_parameters(module: nn.Module) -> set[int]:
    return {id(p) for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
            for p in m.parameters(recurse=False)}


class GradientBuckets:
    """Averages the gradients of ``module``'s parameters across ``comm`` after each backward."""

    def __init__(self, module: nn.Module, comm: Communicator, bucket_size_mb: float = 25.0):
        self.comm = comm
        self.bucket_size_mb = bucket_size_mb
        self.enabled = True  # off while gradients accumulate over several batches
        params = [p for p in module.parameters() if p.requires_grad]
        sparse_ids = _sparse_parameters(module)
        self.sparse_params = [p for p in params if id(p) in sparse_ids]
        self.buckets = self._plan([p for p in params if id(p) not in sparse_ids])
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient_ready)
                       for b in self.buckets for p in b.params]

    def _plan(self, params: list[nn.Parameter]) -> list[_Bucket]:
        limit = max(1, int(self.bucket_size_mb * 2**20))
        groups: list[list[nn.Parameter]] = []
        size = 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            same_kind = groups and groups[-1][0].dtype == p.dtype and groups[-1][0].device == p.device
            if not same_kind or size + nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += nbytes
        layouts = [FlatLayout(group) for group in groups]
        return [_Bucket(group, layout, layout.empty()) for group, layout in zip(groups, layouts)]

    def _on_gradient_ready(self, param: nn.Parameter) -> None:
        if not self.enabled or self.comm.size == 1:
            return
        bucket = self._bucket_of[id(param)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)
        for other in self.buckets:  # MPI progresses non-blocking collectives only inside MPI calls
            if other.handle is not None:
                other.handle.test()

    def _launch(self, bucket: _Bucket) -> None:
        for p in bucket.params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"a parameter of shape {tuple(p.shape)} produced a sparse gradient outside "
                                   "nn.Embedding(sparse=True); it cannot be bucketed")
        bucket.layout.pack([p.grad for p in bucket.params], out=bucket.flat)
        bucket.handle = self.comm.iallreduce(bucket.flat, "sum")

    def synchronize(self) -> None:
        """Wait for every bucket, average, and leave identical gradients on every rank."""
        if not self.enabled or self.comm.size == 1:
            return
        for bucket in self.buckets:
            if bucket.handle is None:  # some of its parameters got no gradient this step
                self._launch(bucket)
        size = self.comm.size
        with torch.no_grad():
            for bucket in self.buckets:
                # polling with short sleeps: a process waiting for a slower peer leaves the core to this
                # host's other threads (checkpoint writer, logger) instead of spinning in MPI_Wait
                flat = bucket.handle.wait(yield_cpu=True).div_(size)
                for p, averaged in zip(bucket.params, bucket.layout.slices(flat)):
                    if p.grad is None:
                        p.grad = averaged.clone()
                    else:
                        p.grad.copy_(averaged)
                bucket.ready, bucket.handle = 0, None
            for p in self.sparse_params:
                local = p.grad if p.grad is not None else torch.sparse_coo_tensor(
                    torch.empty((1, 0), dtype=torch.long), torch.empty((0, *p.shape[1:])), p.shape,
                    dtype=p.dtype, device=p.device)
                p.grad = self.comm.allreduce_sparse(local, "mean")

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
