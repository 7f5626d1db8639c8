"""A parameter server over MPI with bounded staleness (Stale Synchronous Parallel, Ho et al. 2013).

Rank 0 holds the authoritative parameters and optimizer; every other rank is a worker. A worker
pushes a gradient tagged with the version of the parameters it computed it from; the server
applies it as soon as it arrives and answers with the latest parameters and their version.
No worker waits for another one, only for the server's answer.

Staleness of a gradient = server version when it is applied - version it was computed from.
Before handing a worker new parameters (which starts a new gradient computation), the server
checks that no gradient in flight could then exceed the bound ``max_staleness``: every
computation in flight may be applied before any other one, so for each in-flight worker ``w``
"updates applied since w pulled + other computations in flight" must stay <= S. A worker that
would break the bound waits for its parameters until slower workers have pushed.

The server also stops the run: it hands out exactly ``limit`` computations (a step: one push,
after however many batches the worker accumulated), so every computed gradient is applied and none
is dropped; then every worker is told to stop. A worker's pass over its shard is
``steps_per_epoch`` steps (it says so in its hello), an epoch of the run the sum over the workers.

A computation can end without a gradient: the precision plugin's GradScaler found inf/nan and
skipped the step, or the training step returned no loss. The worker then sends SKIPPED instead of a
gradient. The server counts the step as done (the run's step count, epoch ends and LR schedules go
on, as Lightning's do when the scaler skips a step) but applies nothing, so the parameter version,
which staleness is measured in, does not move; the worker leaves the in-flight set and is answered
with the newest parameters like any other. This keeps both invariants without special cases: the
in-flight set is exactly the computations that may still arrive, and the limit counts every batch
a worker consumes, so an epoch stays one pass over every shard.

Where the workers count their own epochs (manual optimization: a batch makes as many steps as the
module asks for, so the server cannot know the epoch in steps), each says hello with an unknown epoch
size and sends FINISHED when its last epoch is done: it leaves the run, which goes on with the others
until the last has finished (or ``limit`` steps, when the run has one), and the server records the
epochs done.

A worker whose training ends on its own (``trainer.should_stop`` set by a callback such as Lightning's
``Timer``, or by the module) sends LEAVE: its computation in flight is forgotten, and the run stops
as one, as Lightning stops every process when one of them asks to: the computations in flight are
still applied, then every other worker is told to stop.

Optional delay compensation (DC-ASGD, Zheng et al. 2017): g + lambda * g * g * (w_now - w_pulled).

Wire format: a worker's message is a ``Header`` (``TAG_HEADER``) naming its ``MessageKind``, followed,
for a GRADIENT only, by the payload tensors (``TAG_PAYLOAD``) in ``ParameterSet``'s order. The server
answers with a ``Reply`` (``TAG_REPLY``: the parameters' version, and whether to go on) followed by
the parameters and counters (``TAG_REPLY_PAYLOAD``).
"""

from __future__ import annotations

import enum
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_xd.comm.communicator import Communicator
from lightning_xd.comm.flat import FlatLayout

SERVER = 0
TAG_HEADER, TAG_PAYLOAD, TAG_REPLY, TAG_REPLY_PAYLOAD = 101, 102, 103, 104


class MessageKind(enum.IntEnum):
    """What a worker's message to the server says."""

    HELLO = 0  # joining the run: steps per epoch; answered with parameters (or stop)
    GRADIENT = 1  # a computation's gradient, payload follows; answered with parameters (or stop)
    SKIPPED = 2  # a computation ended without a gradient; answered with parameters (or stop)
    LEAVE = 3  # stopping on its own: the run stops as one; no answer
    FINISHED = 4  # its epochs are done (workers count epochs): the run goes on without it; no answer


@dataclass(frozen=True)
class Header:
    """A worker's message to the server, before any payload; each field means one thing in every kind."""

    kind: MessageKind
    version: int = -1  # version of the parameters the computation started from (-1: none yet)
    optimizer: int = 0  # GRADIENT, SKIPPED: whose parameters the computation's step was for
    steps_per_epoch: int = 0  # HELLO: steps in one pass over the worker's shard (0: unknown)
    epochs: int = 0  # FINISHED: epochs the worker did
    loss: float = 0.0  # GRADIENT, SKIPPED: the computation's loss (nan: none)

    SIZE: ClassVar[int] = 6

    def to_tensor(self) -> Tensor:
        values = [self.kind, self.version, self.optimizer, self.steps_per_epoch, self.epochs, self.loss]
        return torch.tensor(values, dtype=torch.float64)  # exact for integers below 2**53

    @classmethod
    def empty_tensor(cls) -> Tensor:
        return torch.empty(cls.SIZE, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> Header:
        kind, version, optimizer, steps_per_epoch, epochs, loss = t.tolist()
        return cls(MessageKind(int(kind)), int(version), int(optimizer), int(steps_per_epoch), int(epochs), loss)


@dataclass(frozen=True)
class Reply:
    """The server's answer to a worker, before the parameters: their version, and whether to go on
    computing (False: the run is over for this worker; the parameters come all the same)."""

    version: int
    go: bool

    SIZE: ClassVar[int] = 2

    def to_tensor(self) -> Tensor:
        return torch.tensor([self.version, int(self.go)], dtype=torch.int64)

    @classmethod
    def empty_tensor(cls) -> Tensor:
        return torch.empty(cls.SIZE, dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> Reply:
        version, go = t.tolist()
        return cls(int(version), bool(go))


class ParameterSet:
    """The tensors workers and server exchange, in one order both sides agree on.

    Pull: every parameter and floating-point buffer (running statistics follow the latest
    push), and the integer buffers (counters such as BatchNorm's ``num_batches_tracked``). Push: the
    gradients of one optimizer's parameters with which of them have one (a parameter the step did not
    reach keeps ``grad = None`` on the server too, so the optimizer leaves it alone, as in one process);
    sparse gradients travel as (indices, values), never densified; the floating-point buffers; and how
    far the counters moved since the pull (the server adds that up: it counts every worker's batches).
    """

    def __init__(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]):
        self.params = [p for p in module.parameters()]
        self.buffers = [b for b in module.buffers() if b.is_floating_point()]
        self.counters = [b for b in module.buffers() if not b.is_floating_point()]
        self.state = FlatLayout(self.params + self.buffers)
        self.counter_layout = FlatLayout(self.counters) if self.counters else None
        sparse_ids = {
            id(p)
            for m in module.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
            for p in m.parameters(recurse=False)
        }
        self.groups = [[p for g in opt.param_groups for p in g["params"]] for opt in optimizers]
        self.dense = [[p for p in group if id(p) not in sparse_ids] for group in self.groups]
        self.sparse = [[p for p in group if id(p) in sparse_ids] for group in self.groups]
        self.dense_layouts = [FlatLayout(d) if d else None for d in self.dense]
        self.buffer_layout = FlatLayout(self.buffers) if self.buffers else None

    def pack_state(self) -> Tensor:
        return self.state.pack([t.detach() for t in self.params + self.buffers])

    def load_state(self, flat: Tensor) -> None:
        self.state.unpack(flat, [p.data for p in self.params] + self.buffers)

    def pack_counters(self) -> Tensor | None:
        return self.counter_layout.pack(self.counters) if self.counter_layout is not None else None

    def load_counters(self, flat: Tensor | None) -> None:
        if flat is not None:
            self.counter_layout.unpack(flat, self.counters)

    def share(self, broadcast: Callable[[Tensor], Tensor]) -> None:
        """Every rank takes the root's parameters, buffers and counters (``broadcast`` a flat tensor)."""
        self.load_state(broadcast(self.pack_state()))
        if self.counter_layout is not None:
            self.load_counters(broadcast(self.pack_counters()))


@dataclass
class Gradient:
    worker: int
    version: int
    optimizer: int
    loss: float
    dense: Tensor | None
    present: Tensor | None  # which dense parameters have a gradient (1) or none (0)
    sparse: list[tuple[Tensor, Tensor]]
    buffers: Tensor | None
    counters: Tensor | None  # how far the integer buffers moved during the computation
    applied: bool = True  # False: the worker's step ended without a gradient (MessageKind.SKIPPED)


class WorkerClient:
    """A worker's side of the protocol: hello, push a gradient (or SKIPPED), pull parameters, LEAVE."""

    def __init__(self, comm: Communicator, params: ParameterSet):
        self.comm, self.params = comm, params
        self.version = -1
        self.stopped = False  # the server said stop, or we left: nothing more may be sent
        self.pulled_counters: Tensor | None = None

    def _send_header(self, header: Header) -> None:
        self.comm.send(header.to_tensor(), SERVER, TAG_HEADER)

    def hello(self, steps_per_epoch: int) -> bool:
        """Announce ourselves and how many steps one pass over our shard takes (0: unknown);
        returns False when the server says stop instead of sending parameters."""
        self._send_header(Header(MessageKind.HELLO, steps_per_epoch=steps_per_epoch))
        return self.pull()

    def skip(self, optimizer: int) -> None:
        """End the computation in flight without a gradient (the step was skipped)."""
        self._send_header(Header(MessageKind.SKIPPED, self.version, optimizer=optimizer, loss=float("nan")))

    def leave(self) -> None:
        """Stop before the server said so: our computation in flight will never be pushed."""
        self._send_header(Header(MessageKind.LEAVE, self.version))
        self.stopped = True

    def finish(self, epochs: int) -> None:
        """Our last epoch is done (the workers count epochs): the run goes on without us."""
        self._send_header(Header(MessageKind.FINISHED, self.version, epochs=epochs))
        self.stopped = True

    def push(self, optimizer: int, loss: float) -> None:
        """Send the gradients of ``optimizer``'s parameters, tagged with the version they come from."""
        p = self.params
        self._send_header(Header(MessageKind.GRADIENT, self.version, optimizer=optimizer, loss=loss))
        if p.dense_layouts[optimizer] is not None:
            present = torch.tensor([q.grad is not None for q in p.dense[optimizer]], dtype=torch.uint8)
            self.comm.send(present, SERVER, TAG_PAYLOAD)
            self.comm.send(p.dense_layouts[optimizer].pack([q.grad for q in p.dense[optimizer]]), SERVER, TAG_PAYLOAD)
        for q in p.sparse[optimizer]:
            grad = q.grad.coalesce() if q.grad is not None else None
            indices = grad.indices()[0].contiguous() if grad is not None else torch.empty(0, dtype=torch.long)
            values = grad.values().contiguous() if grad is not None else torch.empty(0, *q.shape[1:])
            self.comm.send(torch.tensor([indices.numel()]), SERVER, TAG_PAYLOAD)
            if indices.numel():
                self.comm.send(indices, SERVER, TAG_PAYLOAD)
                self.comm.send(values.to(q.dtype), SERVER, TAG_PAYLOAD)
        if p.buffer_layout is not None:
            self.comm.send(p.buffer_layout.pack(p.buffers), SERVER, TAG_PAYLOAD)
        if p.counter_layout is not None:
            self.comm.send(p.pack_counters() - self.pulled_counters, SERVER, TAG_PAYLOAD)

    def pull(self) -> bool:
        """Wait for the server's newest parameters; False when they come with the order to stop."""
        received = Reply.empty_tensor()
        self.comm.irecv(received, SERVER, TAG_REPLY).wait(yield_cpu=True)  # the server may make us wait
        reply = Reply.from_tensor(received)
        flat = self.params.state.empty()
        self.comm.recv(flat, SERVER, TAG_REPLY_PAYLOAD)
        self.params.load_state(flat)
        if self.params.counter_layout is not None:
            self.pulled_counters = self.params.counter_layout.empty()
            self.comm.recv(self.pulled_counters, SERVER, TAG_REPLY_PAYLOAD)
            self.params.load_counters(self.pulled_counters)
        self.version = reply.version
        self.stopped = not reply.go
        return not self.stopped


@dataclass
class ServerStats:
    staleness: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    skipped: int = 0  # steps that ended without a gradient
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    @property
    def updates_per_s(self) -> float:
        seconds = (self.finished or time.perf_counter()) - self.started
        return len(self.staleness) / max(seconds, 1e-9)

    def summary(self) -> dict:
        hist = Counter(self.staleness)
        return {
            "staleness_mean": sum(self.staleness) / max(1, len(self.staleness)),
            "staleness_max": max(self.staleness, default=0),
            "staleness_histogram": {str(k): hist[k] for k in sorted(hist)},
            "updates": len(self.staleness),
            "skipped_steps": self.skipped,
            "updates_per_s": self.updates_per_s,
        }


class ParameterServer:
    """The server's side: receive, apply, answer within the staleness bound, stop at the limit.

    ``version`` counts the gradients applied (the clock staleness is measured in), ``steps`` the
    computations finished, applied or skipped (the run's global step: epochs and limits count these).
    """

    def __init__(
        self,
        comm: Communicator,
        params: ParameterSet,
        optimizers: Sequence[torch.optim.Optimizer],
        max_staleness: int,
        delay_compensation: float = 0.0,
        version: int = 0,
        steps: int | None = None,
        after_step: Callable[[ParameterServer, Gradient], None] | None = None,
    ):
        self.comm, self.params, self.optimizers = comm, params, list(optimizers)
        self.max_staleness, self.delay_compensation = max_staleness, delay_compensation
        self.version = version
        self.steps = version if steps is None else steps
        self.after_step = after_step
        self.workers = list(range(1, comm.size))
        self.pulled: dict[int, int] = {}  # worker -> version of its computation in flight
        self.sent_state: dict[int, Tensor] = {}  # worker -> parameters it computes on (delay compensation)
        self.waiting: deque[int] = deque()
        self.stopped: set[int] = set()
        self.limit: float | None = None
        self.steps_per_epoch = 0
        self.epochs_finished = 0  # where the workers count epochs: the most any finished worker did
        self.stats = ServerStats()

    # ---- the loop ------------------------------------------------------------------------
    def serve(self, limit: Callable[[int], float]) -> ServerStats:
        """Run until every worker has stopped. ``limit(steps_per_epoch)`` -> the steps the run takes (inf:
        until every worker has finished its epochs)."""
        for _ in self.workers:  # every worker says hello first: the epoch size is the sum of theirs
            worker, header = self._receive_header()
            self.steps_per_epoch += header.steps_per_epoch
            self.waiting.append(worker)
        self.limit = limit(self.steps_per_epoch)
        self._answer_waiting()
        idle = 0.0
        while len(self.stopped) < len(self.workers):
            if self.comm.iprobe(tag=TAG_HEADER) is None:
                time.sleep(idle)  # an idle server must not take a core from the workers
                idle = min(1e-3, idle + 5e-5)
                continue
            idle = 0.0
            gradient = self._receive_gradient()
            if gradient is None:  # a worker left
                self._answer_waiting()
                continue
            self._apply(gradient)
            self.waiting.append(gradient.worker)
            self._answer_waiting()
        self.stats.finished = time.perf_counter()
        return self.stats

    # ---- receiving -------------------------------------------------------------------------
    def _receive_header(self) -> tuple[int, Header]:
        """The next header from any worker: (worker, header)."""
        received = Header.empty_tensor()
        status = self.comm.recv(received, tag=TAG_HEADER)
        return status.Get_source(), Header.from_tensor(received)

    def _receive_gradient(self) -> Gradient | None:
        """The next worker's gradient (or SKIPPED); None when the message was a worker leaving."""
        worker, header = self._receive_header()
        version, optimizer, loss = header.version, header.optimizer, header.loss
        if header.kind == MessageKind.LEAVE:
            self._leave(worker)
            return None
        if header.kind == MessageKind.FINISHED:
            self._finish(worker, epochs=header.epochs)
            return None
        if header.kind == MessageKind.SKIPPED:
            return Gradient(worker, version, optimizer, loss, None, None, [], None, None, applied=False)
        if header.kind != MessageKind.GRADIENT:
            raise RuntimeError(f"worker {worker} sent {header.kind.name} during training")
        p = self.params
        dense = present = None
        if p.dense_layouts[optimizer] is not None:
            present = torch.empty(len(p.dense[optimizer]), dtype=torch.uint8)
            self.comm.recv(present, worker, TAG_PAYLOAD)
            dense = p.dense_layouts[optimizer].empty()
            self.comm.recv(dense, worker, TAG_PAYLOAD)
        sparse = []
        for q in p.sparse[optimizer]:
            count = torch.empty(1, dtype=torch.int64)
            self.comm.recv(count, worker, TAG_PAYLOAD)
            indices = torch.empty(int(count), dtype=torch.long)
            values = torch.empty(int(count), *q.shape[1:], dtype=q.dtype)
            if int(count):
                self.comm.recv(indices, worker, TAG_PAYLOAD)
                self.comm.recv(values, worker, TAG_PAYLOAD)
            sparse.append((indices, values))
        buffers = counters = None
        if p.buffer_layout is not None:
            buffers = p.buffer_layout.empty()
            self.comm.recv(buffers, worker, TAG_PAYLOAD)
        if p.counter_layout is not None:
            counters = p.counter_layout.empty()
            self.comm.recv(counters, worker, TAG_PAYLOAD)
        return Gradient(worker, version, optimizer, loss, dense, present, sparse, buffers, counters)

    # ---- applying ----------------------------------------------------------------------------
    def _forget(self, worker: int) -> None:
        """``worker`` sends nothing more: drop its computation in flight, if any."""
        self.pulled.pop(worker, None)
        self.sent_state.pop(worker, None)
        self.stopped.add(worker)

    def _leave(self, worker: int) -> None:
        """``worker`` stopped on its own: forget its computation in flight and stop the run as one."""
        self._forget(worker)
        self.limit = min(self.limit, self.steps + len(self.pulled))  # what is in flight, then nothing more

    def _finish(self, worker: int, epochs: int) -> None:
        """``worker`` did its epochs: it has nothing in flight; the others go on."""
        self._forget(worker)
        self.epochs_finished = max(self.epochs_finished, epochs)

    @torch.no_grad()
    def _apply(self, g: Gradient) -> None:
        staleness = self.version - g.version
        assert 0 <= staleness <= self.max_staleness, f"staleness {staleness} broke the bound"
        if not g.applied:
            self._step_done(g)
            self.stats.skipped += 1
            return
        p = self.params
        if g.dense is not None:
            grads = p.dense_layouts[g.optimizer].slices(g.dense)
            if self.delay_compensation:
                pulled = p.state.slices(self.sent_state[g.worker])
                where = {id(q): i for i, q in enumerate(p.params)}
                for q, grad in zip(p.dense[g.optimizer], grads):
                    grad.add_(self.delay_compensation * grad * grad * (q - pulled[where[id(q)]]))
            for q, grad, present in zip(p.dense[g.optimizer], grads, g.present.tolist()):
                q.grad = grad if present else None
        for q, (indices, values) in zip(p.sparse[g.optimizer], g.sparse):
            q.grad = torch.sparse_coo_tensor(indices.unsqueeze(0), values, q.shape).coalesce() if len(indices) else None
        if g.buffers is not None:
            p.buffer_layout.unpack(g.buffers, p.buffers)
        if g.counters is not None:
            p.load_counters(p.pack_counters() + g.counters)
        self.optimizers[g.optimizer].step()
        self.optimizers[g.optimizer].zero_grad(set_to_none=True)
        self.version += 1
        self.stats.staleness.append(staleness)
        self.stats.losses.append(g.loss)
        self._step_done(g)

    def _step_done(self, g: Gradient) -> None:
        del self.pulled[g.worker]
        self.sent_state.pop(g.worker, None)
        self.steps += 1
        if self.after_step is not None:
            self.after_step(self, g)

    # ---- answering -------------------------------------------------------------------------
    def _can_start(self, worker: int) -> bool:
        """Would a new computation by ``worker`` keep every gradient in flight within the bound?"""
        others = [w for w in self.pulled if w != worker]
        if len(others) > self.max_staleness:  # its own gradient could come after all of theirs
            return False
        return all(self.version - self.pulled[w] + len(others) <= self.max_staleness for w in others)

    def _answer_waiting(self) -> None:
        for worker in list(self.waiting):
            if self.steps + len(self.pulled) >= self.limit:
                self._reply(worker, go=False)
            elif self._can_start(worker):
                self._reply(worker, go=True)
            else:
                continue
            self.waiting.remove(worker)

    def _reply(self, worker: int, go: bool) -> None:
        self.comm.send(Reply(self.version, go).to_tensor(), worker, TAG_REPLY)
        state = self.params.pack_state()
        self.comm.send(state, worker, TAG_REPLY_PAYLOAD)
        if self.params.counter_layout is not None:
            self.comm.send(self.params.pack_counters(), worker, TAG_REPLY_PAYLOAD)
        if not go:
            self.stopped.add(worker)
            return
        self.pulled[worker] = self.version
        if self.delay_compensation:
            self.sent_state[worker] = state
