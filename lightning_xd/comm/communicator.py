"""The one thin layer over mpi4py: torch tensors in and out of MPI buffers.

Every strategy talks MPI through a :class:`Communicator`, never through mpi4py directly, so
buffers, dtypes, devices and non-blocking handles are handled in one place.

Contiguous CPU tensors are handed to MPI as zero-copy views of their memory (uppercase,
buffer-based mpi4py calls). Anything else (non-contiguous, CUDA, half precision in a
reduction) is staged through a contiguous CPU copy that is written back when the operation
finishes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

# MPI is imported (and so started) on first use, never on import of this module: the process that
# starts mpirun must not join MPI itself (it would hand its MPI environment down to the job it
# launches), and a process that never uses us must see mpi4py exactly as Lightning expects it.
ANY_SOURCE = ANY_TAG = -1  # MPI_ANY_SOURCE / MPI_ANY_TAG (checked against mpi4py when MPI starts)
_NO_MPI_ARITHMETIC = (torch.float16, torch.bfloat16, torch.bool)
_DTYPE_CODES = [
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.float16,
    torch.bfloat16,
]
_OP_NAMES = {
    "sum": "SUM",
    "mean": "SUM",
    "avg": "SUM",
    "max": "MAX",
    "min": "MIN",
    "prod": "PROD",
    "product": "PROD",
    "band": "BAND",
    "bor": "BOR",
    "bxor": "BXOR",
}
_HEADER_WORDS = 10  # dtype, ndim, up to 8 dimensions


@functools.cache
def mpi() -> Any:
    """mpi4py's MPI module, MPI started with thread support on first call."""
    import mpi4py

    # Open MPI's default algorithm for the non-blocking allreduce (libnbc) falls well behind the blocking
    # MPI_Allreduce on large buffers; Rabenseifner's algorithm keeps up (benchmarks/allreduce.py measures
    # both). Read when MPI starts; a user's own setting wins.
    os.environ.setdefault("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "3")
    mpi4py.rc.thread_level = "multiple"
    from mpi4py import MPI

    assert (MPI.ANY_SOURCE, MPI.ANY_TAG) == (ANY_SOURCE, ANY_TAG)
    return MPI


@functools.cache
def _mpi_types() -> dict:
    MPI = mpi()
    # MPI has no 16-bit float type: moved as raw 16-bit words, reduced in float32.
    return dict(
        zip(
            _DTYPE_CODES,
            [
                MPI.FLOAT,
                MPI.DOUBLE,
                MPI.INT8_T,
                MPI.UINT8_T,
                MPI.INT16_T,
                MPI.INT32_T,
                MPI.INT64_T,
                MPI.C_BOOL,
                MPI.C_FLOAT_COMPLEX,
                MPI.C_DOUBLE_COMPLEX,
                MPI.INT16_T,
                MPI.INT16_T,
            ],
        )
    )


def _mpi_op(name: str) -> Any:
    return getattr(mpi(), _OP_NAMES[name])


_wait_watcher: Callable[[str], AbstractContextManager] | None = None
_waits = threading.local()  # per thread: seconds blocked in MPI so far, and how deep in nested waits


def watch_waits(watcher: Callable[[str], AbstractContextManager] | None) -> None:
    """Have ``watcher(what)`` wrap every wait of this process on MPI (a watchdog timing them), or None."""
    global _wait_watcher
    _wait_watcher = watcher


@contextlib.contextmanager
def watched(what: str) -> Iterator[None]:
    """The context a blocking MPI call runs in: timed into ``waited_seconds()`` and wrapped in the
    installed wait watcher, if any."""
    depth = getattr(_waits, "depth", 0)
    _waits.depth = depth + 1
    started = time.perf_counter()
    try:
        with _wait_watcher(what) if _wait_watcher is not None else contextlib.nullcontext():
            yield
    finally:
        _waits.depth = depth
        if depth == 0:  # a wait inside another (a gather inside a logging call) is already being timed
            _waits.seconds = waited_seconds() + time.perf_counter() - started


def waited_seconds() -> float:
    """Seconds this thread has spent blocked in MPI so far: in blocking calls and in waits for
    non-blocking ones (collectives, agreements, point to point). Inside a training step that is the
    time spent waiting for the other processes (and moving the data), the rest being computation."""
    return getattr(_waits, "seconds", 0.0)


ReduceOpLike = str | Any  # "sum" | "mean" | torch.distributed.ReduceOp.SUM | ...


def op_name(op: ReduceOpLike) -> str:
    """Normalise "mean", "AVG", torch's ReduceOp.SUM ... to a lowercase name."""
    name = (op if isinstance(op, str) else str(op).rsplit(".", 1)[-1]).lower()
    if name not in _OP_NAMES:
        raise ValueError(f"unsupported reduce op {op!r}; use one of {sorted(_OP_NAMES)}")
    return "mean" if name == "avg" else name


def _buffer(tensor: Tensor) -> list:
    """A zero-copy MPI buffer spec over a contiguous CPU tensor."""
    nbytes = tensor.numel() * tensor.element_size()
    mpi_type = _mpi_types().get(tensor.dtype)
    if mpi_type is None:
        raise TypeError(f"dtype {tensor.dtype} cannot be sent through MPI")
    count = nbytes // mpi_type.Get_size()
    return [mpi().buffer.fromaddress(tensor.data_ptr(), nbytes), count, mpi_type]


class _Staged:
    """A contiguous CPU tensor MPI can use in place of ``tensor``, copied back on finish()."""

    def __init__(self, tensor: Tensor, for_reduction: bool = False, copy_in: bool = True):
        self.target = tensor
        needs_upcast = for_reduction and tensor.dtype in _NO_MPI_ARITHMETIC
        direct = tensor.device.type == "cpu" and tensor.is_contiguous() and not needs_upcast
        if direct:
            self.work = tensor
        else:
            dtype = (torch.int32 if tensor.dtype == torch.bool else torch.float32) if needs_upcast else tensor.dtype
            self.work = (
                tensor.detach().to("cpu", dtype) if copy_in else torch.empty(tensor.shape, dtype=dtype)
            ).contiguous()
        self.direct = direct

    def buffer(self) -> list:
        return _buffer(self.work)

    def finish(self) -> Tensor:
        if not self.direct:
            with torch.no_grad():
                self.target.copy_(self.work.to(self.target.dtype) if self.target.dtype == torch.bool else self.work)
        return self.target


class Handle:
    """A non-blocking operation in flight. ``wait()`` completes it and returns its result."""

    def __init__(self, request: Any, finish: Callable[[], Any], keepalive: Any = None, what: str = "an MPI operation"):
        self.what = what
        self._request = request
        self._finish = finish
        self._keepalive = keepalive  # buffers MPI is still reading or writing
        self._result: Any = None
        self._done = False

    def test(self) -> bool:
        """Progress the operation; True once it has completed (wait() then returns at once)."""
        return self._done or bool(self._request.Test())

    def wait(self, yield_cpu: bool = False) -> Any:
        """Complete the operation. ``yield_cpu`` polls with short sleeps instead of MPI's busy
        wait, so a process that waits long (for a server, for a slow peer) leaves its core free."""
        if not self._done:
            with watched(self.what):
                pause = 0.0
                while yield_cpu and not self._request.Test():
                    time.sleep(pause)
                    pause = min(1e-3, pause + 2e-5)
                self._request.Wait()
            self._result = self._finish()
            self._done = True
            self._keepalive = None
        return self._result


def _staged_for_reduction(tensor: Tensor, op: ReduceOpLike) -> tuple[str, _Staged]:
    """The reduction's name and the tensor staged as an MPI buffer (dense tensors only)."""
    name = op_name(op)
    if tensor.is_sparse:
        raise TypeError("sparse tensors are reduced with allreduce_sparse()")
    return name, _Staged(tensor, for_reduction=True)


class Communicator:
    """Torch tensors over one MPI communicator (the whole job's by default)."""

    def __init__(self, mpi_comm: Any | None = None):
        self.mpi = mpi_comm if mpi_comm is not None else world().mpi
        self._local: Communicator | None = None

    # ---- who is here -----------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.mpi.Get_rank()

    @property
    def size(self) -> int:
        return self.mpi.Get_size()

    def split(self, color: int, key: int | None = None) -> Communicator:
        """Sub-communicator of the ranks that pass the same ``color`` (ordered by ``key``)."""
        with watched("splitting the communicator"):
            return Communicator(self.mpi.Split(color, self.rank if key is None else key))

    def local(self) -> Communicator:
        """Sub-communicator of the ranks on this host; made once, on first call.

        Hosts are told apart by name and network hardware addresses, not by MPI's shared-memory
        split: that one waits on the runtime's locality data, which emulated hosts (network
        namespaces on one machine) never deliver, and it would group them as one host anyway.
        """
        if self._local is None:
            keys = self.allgather_object(_host_key())
            self._local = self.split(color=sorted(set(keys)).index(keys[self.rank]))
        return self._local

    def barrier(self) -> None:
        with watched("a barrier"):
            self.mpi.Barrier()

    # ---- collectives on tensors --------------------------------------------------------
    def allreduce(self, tensor: Tensor, op: ReduceOpLike = "sum") -> Tensor:
        """Reduce ``tensor`` over all ranks; in place where the dtype allows, result returned.

        The blocking MPI call, not a non-blocking one waited for: MPI picks its algorithms apart and
        the blocking ones are the faster (benchmarks/allreduce.py)."""
        if self.size == 1:
            return self._local_reduce(tensor, op)
        name, staged = _staged_for_reduction(tensor, op)
        with watched("an allreduce"):
            self.mpi.Allreduce(mpi().IN_PLACE, staged.buffer(), _mpi_op(name))
        return self._reduced(staged, name, self.size)

    def iallreduce(self, tensor: Tensor, op: ReduceOpLike = "sum") -> Handle:
        name, staged = _staged_for_reduction(tensor, op)
        request = self.mpi.Iallreduce(mpi().IN_PLACE, staged.buffer(), _mpi_op(name))
        size = self.size
        return Handle(request, lambda: self._reduced(staged, name, size), staged, "an allreduce")

    def _reduced(self, staged: _Staged, name: str, size: int) -> Tensor:
        """The reduced tensor, back in the caller's tensor (divided by ``size`` for a mean)."""
        result = staged.finish()
        return self._mean(result, size) if name == "mean" else result

    def _local_reduce(self, tensor: Tensor, op: ReduceOpLike) -> Tensor:
        op_name(op)  # validate even when there is nothing to reduce
        return tensor

    @staticmethod
    def _mean(total: Tensor, size: int) -> Tensor:
        if total.is_floating_point() or total.is_complex():
            return total.div_(size)
        return total.double() / size

    def broadcast(self, tensor: Tensor, root: int = 0) -> Tensor:
        """Overwrite ``tensor`` on every rank with root's values."""
        return self.ibroadcast(tensor, root).wait() if self.size > 1 else tensor

    def ibroadcast(self, tensor: Tensor, root: int = 0) -> Handle:
        staged = _Staged(tensor, copy_in=self.rank == root)
        request = self.mpi.Ibcast(staged.buffer(), root=root)
        return Handle(request, staged.finish, staged, "a broadcast")

    def allgather(self, tensor: Tensor) -> Tensor:
        """Stack every rank's ``tensor`` (same shape everywhere) into shape (size, *shape)."""
        return self.iallgather(tensor).wait()

    def iallgather(self, tensor: Tensor) -> Handle:
        send = _Staged(tensor)
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        recv = _Staged(out, copy_in=False)
        buf, count, mpi_type = recv.buffer()
        request = self.mpi.Iallgather(send.buffer(), [buf, count // self.size, mpi_type])
        return Handle(request, recv.finish, (send, recv), "an allgather")

    def allgather_varying(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor``, where the first dimension may differ between ranks."""
        counts = self.allgather_object(int(tensor.shape[0]) if tensor.dim() else 1)
        row = tensor.shape[1:] if tensor.dim() else ()
        row_numel = int(torch.Size(row).numel())
        send = _Staged(tensor.reshape(-1) if tensor.dim() else tensor.reshape(1))
        out = torch.empty((sum(counts) * row_numel,), dtype=tensor.dtype, device=tensor.device)
        recv = _Staged(out, copy_in=False)
        words = _mpi_types()[tensor.dtype].Get_size()
        per_item = row_numel * tensor.element_size() // words
        sizes = [c * per_item for c in counts]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        buf, _, mpi_type = recv.buffer()
        with watched("an allgather"):
            self.mpi.Allgatherv(send.buffer(), [buf, sizes, offsets, mpi_type])
        flat = recv.finish()
        parts = torch.split(flat, [c * row_numel for c in counts])
        if not tensor.dim():
            return [p.reshape(()) for p in parts]
        return [p.reshape(c, *row) for p, c in zip(parts, counts)]

    def allreduce_sparse(self, tensor: Tensor, op: ReduceOpLike = "sum") -> Tensor:
        """Sum (or average) sparse COO tensors by gathering indices and values: never densified."""
        name = op_name(op)
        if name not in ("sum", "mean"):
            raise ValueError(f"sparse tensors support sum and mean, not {name!r}")
        local = tensor.coalesce()
        if self.size == 1:
            return local
        indices = torch.cat(self.allgather_varying(local.indices().t().contiguous())).t()
        values = torch.cat(self.allgather_varying(local.values().contiguous()))
        if name == "mean":
            values = values / self.size
        return torch.sparse_coo_tensor(indices, values, local.shape, device=tensor.device).coalesce()

    # ---- point to point ----------------------------------------------------------------
    def send(self, tensor: Tensor, dest: int, tag: int = 0) -> None:
        with watched(f"a send to rank {dest}"):
            self.mpi.Send(_Staged(tensor).buffer(), dest=dest, tag=tag)

    def isend(self, tensor: Tensor, dest: int, tag: int = 0) -> Handle:
        staged = _Staged(tensor)
        request = self.mpi.Isend(staged.buffer(), dest=dest, tag=tag)
        return Handle(request, lambda: tensor, staged, f"a send to rank {dest}")

    def recv(self, tensor: Tensor, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Any:
        """Receive into ``tensor``; the returned status says who sent it, with which tag."""
        staged = _Staged(tensor, copy_in=False)
        status = mpi().Status()
        with watched("a receive"):
            self.mpi.Recv(staged.buffer(), source=source, tag=tag, status=status)
        staged.finish()
        return status

    def irecv(self, tensor: Tensor, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Handle:
        staged = _Staged(tensor, copy_in=False)
        request = self.mpi.Irecv(staged.buffer(), source=source, tag=tag)
        return Handle(request, staged.finish, staged, "a receive")

    # ---- tensors whose shape the receiver does not know (activations between pipeline stages)
    def isend_tensor(self, tensor: Tensor, dest: int, tag: int) -> list[Handle]:
        """Send shape and dtype, then the data; receive with ``recv_tensor``."""
        header = torch.tensor([_DTYPE_CODES.index(tensor.dtype), tensor.dim(), *tensor.shape], dtype=torch.int64)
        padded = torch.zeros(_HEADER_WORDS, dtype=torch.int64)
        padded[: header.numel()] = header
        return [self.isend(padded, dest, tag), self.isend(tensor.detach().contiguous(), dest, tag)]

    def recv_tensor(self, source: int, tag: int, device: torch.device | None = None) -> Tensor:
        header = torch.empty(_HEADER_WORDS, dtype=torch.int64)
        self.recv(header, source, tag)
        dtype, ndim = _DTYPE_CODES[int(header[0])], int(header[1])
        tensor = torch.empty(tuple(int(n) for n in header[2 : 2 + ndim]), dtype=dtype, device=device)
        self.recv(tensor, source, tag)
        return tensor

    def broadcast_tensor(self, tensor: Tensor | None, root: int) -> Tensor:
        """Broadcast a tensor only ``root`` knows the shape of (others pass None)."""
        meta = self.broadcast_object((tensor.dtype, tuple(tensor.shape)) if self.rank == root else None, root)
        out = tensor.detach().contiguous() if self.rank == root else torch.empty(meta[1], dtype=meta[0])
        return self.broadcast(out, root)

    def iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> tuple[int, int] | None:
        """(source, tag) of a message waiting to be received, or None (never blocks)."""
        status = mpi().Status()
        if self.mpi.Iprobe(source=source, tag=tag, status=status):
            return status.Get_source(), status.Get_tag()
        return None

    # ---- small Python objects (pickled) ------------------------------------------------
    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        with watched("a broadcast"):
            return self.mpi.bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list:
        with watched("an allgather"):
            return self.mpi.allgather(obj)


def _host_key() -> str:
    import glob
    import socket

    addresses = []
    for path in glob.glob("/sys/class/net/*/address"):
        try:
            addresses.append(open(path).read().strip())
        except OSError:
            pass
    return socket.gethostname() + "|" + ",".join(sorted(a for a in addresses if a.strip("0:")))


def wait_all(handles: list[Handle]) -> list:
    """Complete every handle, in order, and return their results."""
    return [h.wait() for h in handles]


_world: Communicator | None = None


def world() -> Communicator:
    """The communicator of every process in this job (MPI starts on first use)."""
    global _world
    if _world is None:
        _world = Communicator(mpi().COMM_WORLD)
    return _world
