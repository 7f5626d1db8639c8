"""Gradient averaging over a communicator in flat buckets, overlapped with backward.

Parameters that require gradients are grouped, in reverse registration order (roughly the order
backward produces their gradients), into buckets. An autograd hook marks a parameter ready once
its gradient has been accumulated; buckets start their non-blocking allreduce strictly in bucket
order (a next-bucket pointer, as DDP's reducer keeps): MPI matches non-blocking collectives by the
order in which they were started, so two ranks whose gradients complete in different orders (a
data-dependent branch) must still start bucket 0, then 1, then 2 ... or they would sum different
buckets together. ``synchronize()`` starts whatever backward left unstarted, in the same order,
waits, averages and writes the gradients back.

Bucket sizes: the first bucket (the last layers, ready first) is small so communication starts
early, the others larger: ``bucket_size_mb`` for both when given; by default (``None``) a quarter of
the model, between 64 KB and 25 MB, and a first bucket of at most 1 MB, so that a model of a few
MB is cut into several buckets and overlaps too (25 MB buckets, DDP's default, would hold it whole).

Unused parameters. Every step also reduces, in one small allreduce started after the last bucket,
how many ranks gave each parameter a gradient. A parameter that no rank used keeps ``grad = None``
(a zero gradient would still move it under momentum or weight decay). A parameter used on some
ranks only is averaged with zeros from the others when ``find_unused_parameters`` is on (DDP's
switch of that name; the autograd graph is walked before backward so buckets holding an unused
parameter need not wait for it); without it, every rank raises the same one-line error naming the
parameter, as DDP does. Parameters whose ``requires_grad`` changes during training (Lightning's
``BackboneFinetuning``) are averaged too: the buckets are re-planned before the next backward.

Sparse gradients (``nn.Embedding(sparse=True)``) never enter a bucket: their indices and values
are gathered from every rank and summed, so they stay sparse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_xd.comm.communicator import Communicator, Handle
from lightning_xd.comm.flat import FlatLayout
from lightning_xd.errors import UserError

MB = 2**20
DEFAULT_MAX_BUCKET_MB, DEFAULT_FIRST_BUCKET_MB, DEFAULT_MIN_BUCKET_MB = 25.0, 1.0, 1 / 16


@dataclass(eq=False)
class _Bucket:
    params: list[nn.Parameter]
    layout: FlatLayout
    flat: Tensor
    ready: set[int] = field(default_factory=set)  # ids of the parameters whose gradient is final
    handle: Handle | None = None

    @property
    def complete(self) -> bool:
        return len(self.ready) == len(self.params)


def _sparse_parameters(module: nn.Module) -> set[int]:
    return {
        id(p)
        for m in module.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
        for p in m.parameters(recurse=False)
    }


def bucket_limits(total_bytes: int, bucket_size_mb: float | None) -> tuple[int, int]:
    """(first bucket, later buckets) in bytes: ``bucket_size_mb`` for both, or the default sizing."""
    if bucket_size_mb is not None:
        limit = max(1, int(bucket_size_mb * MB))
        return limit, limit
    later = int(min(DEFAULT_MAX_BUCKET_MB * MB, max(DEFAULT_MIN_BUCKET_MB * MB, total_bytes / 4)))
    return min(later, int(DEFAULT_FIRST_BUCKET_MB * MB)), later


def reachable_parameters(outputs: Tensor) -> set[int]:
    """Ids of the leaf tensors that backward from ``outputs`` will reach (the autograd graph, walked)."""
    found, seen = set(), set()
    stack = [outputs.grad_fn] if outputs.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


class GradientBuckets:
    """Averages the gradients of ``module``'s parameters across ``comm`` after each backward."""

    def __init__(
        self,
        module: nn.Module,
        comm: Communicator,
        bucket_size_mb: float | None = None,
        find_unused_parameters: bool = False,
        overlap: bool = True,
    ):
        self.module, self.comm = module, comm
        self.bucket_size_mb, self.find_unused_parameters, self.overlap = bucket_size_mb, find_unused_parameters, overlap
        self.enabled = True  # off while gradients accumulate over several batches
        self.names = {id(p): name for name, p in module.named_parameters()}
        self._sparse_ids = _sparse_parameters(module)
        self._hooks: list = []
        self._plan_for(self._trainable())

    # ---- the plan: which parameters, in which buckets -------------------------------------------
    def _trainable(self) -> tuple[nn.Parameter, ...]:
        return tuple(p for p in self.module.parameters() if p.requires_grad)

    def _plan_for(self, params: tuple[nn.Parameter, ...]) -> None:
        self.remove()
        self._planned = tuple(id(p) for p in params)
        self.params = [p for p in params if id(p) not in self._sparse_ids]
        self.sparse_params = [p for p in params if id(p) in self._sparse_ids]
        self.buckets = self._plan(self.params)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._next = 0  # the next bucket to start: buckets start in order, whatever order they complete in
        self._used = torch.zeros(len(self.params), dtype=torch.int32)
        self._used_handle: Handle | None = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient_ready) for p in self.params]

    def _plan(self, params: list[nn.Parameter]) -> list[_Bucket]:
        first, later = bucket_limits(sum(p.numel() * p.element_size() for p in params), self.bucket_size_mb)
        groups: list[list[nn.Parameter]] = []
        size = 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            limit = first if len(groups) <= 1 else later
            same_kind = groups and groups[-1][0].dtype == p.dtype and groups[-1][0].device == p.device
            if not same_kind or size + nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += nbytes
        layouts = [FlatLayout(group) for group in groups]
        return [_Bucket(group, layout, layout.empty()) for group, layout in zip(groups, layouts)]

    @property
    def active(self) -> bool:
        return self.enabled and self.comm.size > 1

    # ---- during backward ------------------------------------------------------------------------
    def prepare_for_backward(self, loss: Tensor | None = None) -> None:
        """Before a backward whose gradients will be averaged: follow ``requires_grad`` changes and, with
        ``find_unused_parameters``, mark what ``loss`` cannot reach as ready (its gradient is final)."""
        if not self.active:
            return
        if tuple(id(p) for p in self._trainable()) != self._planned:
            self._drain()
            self._plan_for(self._trainable())
        if self.find_unused_parameters and loss is not None and self.overlap:
            reached = reachable_parameters(loss)
            for p in self.params:
                if id(p) not in reached:
                    self._mark_ready(p)

    def _on_gradient_ready(self, param: nn.Parameter) -> None:
        if not self.active or not self.overlap:
            return
        self._mark_ready(param)
        for bucket in self.buckets[: self._next]:  # MPI progresses non-blocking collectives only inside MPI calls
            bucket.handle.test()

    def _mark_ready(self, param: nn.Parameter) -> None:
        bucket = self._bucket_of[id(param)]
        if bucket.handle is not None:
            raise UserError(
                f"parameter {self.names.get(id(param), tuple(param.shape))} got a second gradient after "
                "its bucket was sent in the same backward (a reentrant or repeated backward); call "
                "backward once per step, or accumulate under the strategy's block_backward_sync()"
            )
        bucket.ready.add(id(param))
        while self._next < len(self.buckets) and self.buckets[self._next].complete:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        for p in bucket.params:
            if p.grad is not None and p.grad.is_sparse:
                raise UserError(
                    f"parameter {self.names.get(id(p))} produced a sparse gradient outside "
                    "nn.Embedding(sparse=True); it cannot be bucketed"
                )
        bucket.layout.pack([p.grad for p in bucket.params], out=bucket.flat)
        bucket.handle = self.comm.iallreduce(bucket.flat, "sum")

    # ---- after backward ---------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Start what backward left unstarted (in bucket order), wait, average: every rank then holds the
        same gradients; globally unused parameters keep ``grad = None``."""
        if not self.active:
            return
        if tuple(id(p) for p in self._trainable()) != self._planned:  # changed after prepare: no overlap this time
            self._drain()
            self._plan_for(self._trainable())
        for bucket in self.buckets[self._next :]:
            self._launch(bucket)
        self._next = len(self.buckets)
        for i, p in enumerate(self.params):
            self._used[i] = int(p.grad is not None)
        used_handle = self.comm.iallreduce(self._used, "sum")
        size = self.comm.size
        try:
            with torch.no_grad():
                # polling with short sleeps: a process waiting for a slower peer leaves the core to this
                # host's other threads (checkpoint writer, logger) instead of spinning in MPI_Wait
                averaged = [bucket.handle.wait(yield_cpu=True).div_(size) for bucket in self.buckets]
                used = used_handle.wait(yield_cpu=True).tolist()
                self._check_used(used, size)
                for bucket, flat in zip(self.buckets, averaged):
                    for p, value in zip(bucket.params, bucket.layout.slices(flat)):
                        if used[self._position[id(p)]] == 0:
                            p.grad = None
                        elif p.grad is None:
                            p.grad = value.clone()
                        else:
                            p.grad.copy_(value)
                for p in self.sparse_params:
                    p.grad = self.comm.allreduce_sparse(self._local_sparse(p), "mean")
        finally:
            self._reset()

    def _check_used(self, used: list[int], size: int) -> None:
        """Without ``find_unused_parameters`` every rank must have given every parameter a gradient."""
        if self.find_unused_parameters:
            return
        missing = [
            (self.names.get(id(p), str(tuple(p.shape))), size - n) for p, n in zip(self.params, used) if n < size
        ]
        if missing:
            shown = ", ".join(f"{name} (on {n} of {size} processes)" for name, n in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UserError(
                f"parameters got no gradient in this step: {shown}{more}; use them in the loss, freeze them "
                "(requires_grad=False), or pass find_unused_parameters=True to the strategy "
                "(--find-unused-parameters true), as with DDP"
            )

    def _local_sparse(self, p: nn.Parameter) -> Tensor:
        if p.grad is not None:
            return p.grad
        return torch.sparse_coo_tensor(
            torch.empty((1, 0), dtype=torch.long),
            torch.empty((0, *p.shape[1:])),
            p.shape,
            dtype=p.dtype,
            device=p.device,
        )

    def _drain(self) -> None:
        """Complete (and drop) the allreduces of the current plan already started, on every rank alike."""
        for bucket in self.buckets[: self._next]:
            bucket.handle.wait()
        self._reset()

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.handle = None
        self._next = 0

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
