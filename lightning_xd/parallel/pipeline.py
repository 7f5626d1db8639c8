"""Pipeline parallelism: a model cut into stages on different processes, micro-batches flowing through.

A model that supports it exposes ``pipeline_blocks()`` (its blocks in order, each called as
``block(h, batch)``), ``pipeline_input(batch)`` and ``pipeline_loss(output, batch, split)``
(``lightning_xd.models.pipelined`` writes this contract once). A pipeline of P processes cuts the
blocks into P stages, stage s being one or more consecutive blocks (``partition``); process s of
the pipeline runs stage s. Activations go forward and their gradients backward between
neighbouring stages as point-to-point messages. The graph structure of a micro-batch is not sent:
every process of a pipeline reads the same batches from the same deterministic loader.

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


def schedule(kind: str, stage: int, stage_count: int, microbatches: int) -> list[tuple[str, int]]:
    """The order of forward ("F", i) and backward ("B", i) passes of stage ``stage`` (of ``stage_count``)
    in one step."""
    if kind == "gpipe":
        return [("F", i) for i in range(microbatches)] + [("B", i) for i in reversed(range(microbatches))]
    if kind == "1f1b":
        warmup = min(stage_count - stage - 1, microbatches)
        ops = [("F", i) for i in range(warmup)]
        for i in range(warmup, microbatches):
            ops += [("F", i), ("B", i - warmup)]
        return ops + [("B", i) for i in range(microbatches - warmup, microbatches)]
    raise UserError(f"unknown --schedule {kind!r}; use one of {', '.join(SCHEDULES)}")


def partition(sizes: Sequence[int], parts: int) -> list[range]:
    """Cut blocks of the given sizes into ``parts`` stages of consecutive blocks, the largest stage as
    small as it can be; returns each stage's range of block indices."""
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


def _activation_tag(i: int) -> int:
    """Message tag of micro-batch ``i``'s activation, sent forward to the next stage."""
    return 2 * i


def _gradient_tag(i: int) -> int:
    """Message tag of the gradient of micro-batch ``i``'s activation, sent back to the previous stage."""
    return 2 * i + 1


@dataclass
class _TrainStep:
    """What one training step of a stage keeps between its forward and backward passes."""

    microbatches: list
    weights: Sequence[float]
    inputs: dict[int, Tensor] = field(default_factory=dict)  # received activations, until their backward
    outputs: dict[int, Tensor] = field(default_factory=dict)  # outputs (weighted losses on the last stage)
    last_outputs: list = field(default_factory=list)  # the last stage's outputs, detached
    losses: list[Tensor] = field(default_factory=list)  # the last stage's losses, unweighted
    sends: list[Handle] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.last_outputs = [None] * len(self.microbatches)


class PipelineStage:
    """This process's stage of a pipeline (its consecutive blocks of the model): runs them over
    micro-batches, exchanging activations and gradients with the neighbouring stages.

    ``comm`` is the pipeline's communicator: its rank is this stage's index, its size the number of
    stages."""

    def __init__(self, blocks: Sequence[nn.Module], model: nn.Module, comm: Communicator):
        self.blocks, self.model, self.comm = list(blocks), model, comm
        self.stage, self.stage_count = comm.rank, comm.size
        self.first, self.last = self.stage == 0, self.stage == self.stage_count - 1
        self.times = StepTimes()
        self.recorded: list[StepTimes] = []
        self._step_start = 0.0

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
        ops = schedule(kind, self.stage, self.stage_count, len(microbatches))
        last_backward = max(n for n, (op, _) in enumerate(ops) if op == "B")
        step = _TrainStep(microbatches, weights)
        self._start_timing()
        for n, (op, i) in enumerate(ops):
            if op == "F":
                self._forward(step, i, forward_context)
            else:
                self._backward(step, i, backward, before_last_backward if n == last_backward else None)
        self._end_step(step.sends)
        return self._share_outputs(step.last_outputs, microbatches[0]), step.losses

    def eval_step(self, microbatches: list, forward_context: Callable[[], AbstractContextManager]) -> list[Tensor]:
        """Forward only, inside ``forward_context()``; the last stage's outputs, on every process of the pipeline."""
        sends: list[Handle] = []
        last_outputs: list = [None] * len(microbatches)
        with torch.no_grad():
            for i, batch in enumerate(microbatches):
                received = None if self.first else self._receive(_activation_tag(i), self.stage - 1, batch)
                with forward_context():
                    out = self._run_blocks(received, batch)
                if self.last:
                    last_outputs[i] = out
                else:
                    sends += self.comm.isend_tensor(out, self.stage + 1, _activation_tag(i))
        wait_all(sends)
        return self._share_outputs(last_outputs, microbatches[0])

    # ---- one pass of the schedule ---------------------------------------------------------------
    def _forward(self, step: _TrainStep, i: int, forward_context: Callable[[], AbstractContextManager]) -> None:
        """Micro-batch ``i`` through this stage: its activation in (the batch's input on the first stage),
        this stage's output on to the next stage; on the last stage, the loss, weighted, kept for backward."""
        batch = step.microbatches[i]
        received = None if self.first else self._receive(_activation_tag(i), self.stage - 1, batch).requires_grad_()
        start = time.perf_counter()
        with forward_context():
            out = self._run_blocks(received, batch)
            if self.last:
                step.last_outputs[i] = out.detach()
                loss = self.model.pipeline_loss(out, batch, "train")
                step.losses.append(loss.detach())
                out = loss * step.weights[i]
        if received is not None:
            step.inputs[i] = received
        if not self.last:
            step.sends += self.comm.isend_tensor(out, self.stage + 1, _activation_tag(i))
        step.outputs[i] = out
        self._record("F", i, start)

    def _backward(
        self,
        step: _TrainStep,
        i: int,
        backward: Callable[[Tensor, Tensor | None], None],
        before: Callable[[Tensor], None] | None,
    ) -> None:
        """Micro-batch ``i`` back through this stage: the gradient of its output in (none on the last
        stage, whose output is the loss), the gradient of its input back to the previous stage.
        ``before(output)``, if given, runs first."""
        grad = None if self.last else self._receive(_gradient_tag(i), self.stage + 1, step.microbatches[i])
        start = time.perf_counter()
        if before is not None:
            before(step.outputs[i])
        backward(step.outputs.pop(i), grad)
        if not self.first:
            step.sends += self.comm.isend_tensor(step.inputs.pop(i).grad, self.stage - 1, _gradient_tag(i))
        self._record("B", i, start)

    def _run_blocks(self, received: Tensor | None, batch: Any) -> Tensor:
        """This stage's blocks in order, from the received activation (the batch's input on the first stage)."""
        h = self.model.pipeline_input(batch) if self.first else received
        for block in self.blocks:
            h = block(h, batch)
        return h

    def _receive(self, tag: int, source: int, like: Any) -> Tensor:
        return self.comm.recv_tensor(source, tag, device=_device_of(like))

    def _share_outputs(self, outputs: list, like: Any) -> list[Tensor]:
        root, device = self.stage_count - 1, _device_of(like)
        return [self.comm.broadcast_tensor(o if self.last else None, root).to(device) for o in outputs]

    # ---- timing ---------------------------------------------------------------------------------
    def _start_timing(self) -> None:
        self._step_start = time.perf_counter()
        self.times = StepTimes()

    def _record(self, op: str, i: int, start: float) -> None:
        """Pass ``op`` of micro-batch ``i`` computed from ``start`` until now (waiting for its input excluded)."""
        end = time.perf_counter()
        self.times.busy += end - start
        self.times.timeline.append((op, i, start - self._step_start, end - self._step_start))

    def _end_step(self, sends: list[Handle]) -> None:
        """Wait for this step's messages and for the whole pipeline, then record the step's time."""
        wait_all(sends)
        # The step ends when the whole pipeline is done: without this, the last stage would stop its
        # clock before the first stage's final backward and count none of that wait as idle.
        self.comm.barrier()
        self.times.total = time.perf_counter() - self._step_start
        self.recorded.append(self.times)


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
