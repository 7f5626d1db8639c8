"""Pipeline parallelism: a model's stages on different processes, micro-batches flowing through.

A model that supports it exposes ``pipeline_stages()`` (modules called as ``stage(h, batch)``),
``pipeline_input(batch)`` and ``pipeline_loss(output, batch, stage)``. Each process of a
pipeline group runs a contiguous part of the stages; activations go forward and their
gradients backward between neighbours as point-to-point messages. The graph structure of a
micro-batch is not sent: every process of a pipeline reads the same batches from the same
deterministic loader.

Schedules (one step, P stages, M micro-batches):
- ``gpipe``: all M forwards, then all M backwards.
- ``1f1b`` (PipeDream-flush): P-s-1 warm-up forwards on stage s, then one forward and one backward
  in turn, then the remaining backwards; at most P-s activations are alive at once.
Both leave idle time ("bubbles") of about (P-1)/(M+P-1) of a step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xd.comm.communicator import Communicator, Handle, wait_all
from lightning_xd.errors import UserError

SCHEDULES = ("gpipe", "1f1b")


def schedule(kind: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The order of forward ("F", i) and backward ("B", i) passes of ``stage`` in one step."""
    if kind == "gpipe":
        return [("F", i) for i in range(microbatches)] + [("B", i) for i in reversed(range(microbatches))]
    if kind == "1f1b":
        warmup = min(stages - stage - 1, microbatches)
        ops = [("F", i) for i in range(warmup)]
        for i in range(warmup, microbatches):
            ops += [("F", i), ("B", i - warmup)]
        return ops + [("B", i) for i in range(microbatches - warmup, microbatches)]
    raise UserError(f"unknown --schedule {kind!r}; use one of {', '.join(SCHEDULES)}")


def partition(sizes: Sequence[int], parts: int) -> list[range]:
    """Split a sequence of stage sizes into ``parts`` contiguous groups with the smallest largest group."""
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    best: dict[tuple[int, int], tuple[int, list[int]]] = {}

    def solve(start: int, k: int) -> tuple[int, list[int]]:
        if k == 1:
            return prefix[n] - prefix[start], [n]
        if (start, k) not in best:
            options = []
            for end in range(start + 1, n - k + 2):
                rest, cuts = solve(end, k - 1)
                options.append((max(prefix[end] - prefix[start], rest), [end] + cuts))
            best[(start, k)] = min(options)
        return best[(start, k)]

    cuts = [0] + solve(0, parts)[1]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


@dataclass
class StepTimes:
    """Where a process spent a step: computing, or waiting for its neighbours."""

    busy: float = 0.0
    total: float = 0.0
    timeline: list[tuple[str, int, float, float]] = field(default_factory=list)  # op, micro-batch, start, end

    @property
    def idle_fraction(self) -> float:
        return max(0.0, self.total - self.busy) / self.total if self.total else 0.0


class PipelineStage:
    """This process's stages of a pipeline: runs them over micro-batches with its neighbours."""

    def __init__(self, modules: Sequence[nn.Module], model: nn.Module, comm: Communicator):
        self.modules, self.model, self.comm = list(modules), model, comm
        self.stage, self.stages = comm.rank, comm.size
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.times = StepTimes()
        self.recorded: list[StepTimes] = []

    def _run_modules(self, h: Tensor, batch: Any) -> Tensor:
        for module in self.modules:
            h = module(h, batch)
        return h

    def _receive(self, tag: int, source: int, like: Any) -> Tensor:
        return self.comm.recv_tensor(source, tag, device=_device_of(like))

    def train_step(
        self,
        microbatches: list,
        kind: str,
        weights: Sequence[float],
        forward_context: Callable[[], AbstractContextManager],
        backward: Callable[[Tensor, Tensor | None], None],
        before_last_backward: Callable[[Tensor], None],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Forward and backward of every micro-batch in the schedule's order.

        Forwards run inside ``forward_context()`` (the precision plugin's autocast, say), backwards outside
        it, through ``backward(tensor, grad)``: on the last stage ``tensor`` is micro-batch i's loss times
        ``weights[i]`` (its share of the batch's samples, so the step's gradient is that of the batch's
        mean loss) and ``grad`` is None; elsewhere the stage's output and the gradient the next stage sent
        back. ``before_last_backward(tensor)`` is called just before this stage's last backward.
        Returns the outputs of the last stage, detached, on every process of the pipeline, and (on the
        last stage only) the micro-batches' losses, unweighted.
        """
        ops = schedule(kind, self.stage, self.stages, len(microbatches))
        last_backward = max(n for n, (op, _) in enumerate(ops) if op == "B")
        inputs: dict[int, Tensor] = {}
        outputs: dict[int, Tensor] = {}
        last_outputs: list = [None] * len(microbatches)
        losses: list[Tensor] = []
        sends: list[Handle] = []
        step_start = time.perf_counter()
        self.times = StepTimes()
        for n, (op, i) in enumerate(ops):
            batch = microbatches[i]
            if op == "F":
                received = None if self.first else self._receive(2 * i, self.stage - 1, batch).requires_grad_()
                start = time.perf_counter()
                with forward_context():
                    out = self._run_modules(self.model.pipeline_input(batch) if self.first else received, batch)
                    if self.last:
                        last_outputs[i] = out.detach()
                        loss = self.model.pipeline_loss(out, batch, "train")
                        losses.append(loss.detach())
                        out = loss * weights[i]
                if received is not None:
                    inputs[i] = received
                if not self.last:
                    sends += self.comm.isend_tensor(out, self.stage + 1, 2 * i)
                outputs[i] = out
            else:
                grad = None if self.last else self._receive(2 * i + 1, self.stage + 1, batch)
                start = time.perf_counter()
                if n == last_backward:
                    before_last_backward(outputs[i])
                backward(outputs.pop(i), grad)
                if not self.first:
                    sends += self.comm.isend_tensor(inputs.pop(i).grad, self.stage - 1, 2 * i + 1)
            self._record(op, i, start, step_start)
        wait_all(sends)
        # The step ends when the whole pipeline is done: without this, the last stage would stop its
        # clock before the first stage's final backward and count none of that wait as idle.
        self.comm.barrier()
        self.times.total = time.perf_counter() - step_start
        self.recorded.append(self.times)
        return self._share_outputs(last_outputs, microbatches[0]), losses

    def eval_step(self, microbatches: list, forward_context: Callable[[], AbstractContextManager]) -> list[Tensor]:
        """Forward only, inside ``forward_context()``; the last stage's outputs, on every process of the pipeline."""
        sends: list[Handle] = []
        last_outputs: list = [None] * len(microbatches)
        with torch.no_grad():
            for i, batch in enumerate(microbatches):
                received = None if self.first else self._receive(2 * i, self.stage - 1, batch)
                with forward_context():
                    out = self._run_modules(self.model.pipeline_input(batch) if self.first else received, batch)
                if self.last:
                    last_outputs[i] = out
                else:
                    sends += self.comm.isend_tensor(out, self.stage + 1, 2 * i)
        wait_all(sends)
        return self._share_outputs(last_outputs, microbatches[0])

    def _share_outputs(self, outputs: list, like: Any) -> list[Tensor]:
        root, device = self.stages - 1, _device_of(like)
        return [self.comm.broadcast_tensor(o if self.last else None, root).to(device) for o in outputs]

    def _record(self, op: str, i: int, start: float, step_start: float) -> None:
        end = time.perf_counter()
        self.times.busy += end - start
        self.times.timeline.append((op, i, start - step_start, end - step_start))


def _device_of(batch: Any) -> torch.device:
    if isinstance(batch, Tensor):
        return batch.device
    if isinstance(batch, (list, tuple)) and batch:
        return _device_of(batch[0])
    if isinstance(batch, dict) and batch:
        return _device_of(next(iter(batch.values())))
    for value in getattr(batch, "__dict__", {}).values():
        if isinstance(value, Tensor):
            return value.device
    x = getattr(batch, "x", None)
    return x.device if isinstance(x, Tensor) else torch.device("cpu")
