"""Round trips through lightning_xd.comm.communicator on every rank; any mismatch raises (and aborts the job)."""

import torch

from lightning_xd.comm.communicator import world

comm = world()
rank, size = comm.rank, comm.size
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]
SHAPES = [(), (0,), (7,), (3, 4), (2, 3, 5)]


def value(shape, dtype, r):
    t = torch.arange(int(torch.Size(shape).numel())).reshape(shape) % 5 + r + 1
    return t.to(dtype)


def check(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
    assert torch.equal(got, want), f"{what}: got {got} want {want}"


for dtype in DTYPES:
    for shape in SHAPES:
        what = f"{dtype} {shape}"
        parts = [value(shape, dtype, r) for r in range(size)]
        total = sum(p.to(torch.float64) for p in parts).to(dtype)
        check(comm.allreduce(value(shape, dtype, rank), "sum"), total, f"allreduce sum {what}")
        check(comm.allreduce(value(shape, dtype, rank), "max"), parts[-1], f"allreduce max {what}")
        check(comm.iallreduce(value(shape, dtype, rank), "min").wait(), parts[0], f"iallreduce min {what}")
        if dtype.is_floating_point:
            mean = comm.allreduce(value(shape, dtype, rank), "mean")
            want = (sum(p.to(torch.float64) for p in parts) / size).to(dtype)
            assert torch.allclose(mean.double(), want.double(), atol=1e-2), what
        b = value(shape, dtype, rank)
        check(comm.broadcast(b, root=size - 1), parts[-1], f"broadcast {what}")
        check(comm.allgather(value(shape, dtype, rank)), torch.stack(parts), f"allgather {what}")

# non-contiguous inputs are written back in place
t = (torch.arange(12.0).reshape(3, 4) + rank).t()
assert not t.is_contiguous()
out = comm.allreduce(t, "sum")
assert out is t and torch.equal(t, sum(torch.arange(12.0).reshape(3, 4) + r for r in range(size)).t())
nc = torch.zeros(4, 6)[:, ::2]
if rank == 0:
    nc.copy_(torch.arange(12.0).reshape(4, 3))
comm.broadcast(nc, root=0)
assert torch.equal(nc, torch.arange(12.0).reshape(4, 3))
assert torch.equal(comm.allreduce(torch.tensor([rank == 0, False]), "max"), torch.tensor([True, False]))

# "mean" of an integer tensor comes back as floating point; torch's ReduceOp is accepted
assert comm.allreduce(torch.tensor([2 * rank]), "mean").item() == sum(2 * r for r in range(size)) / size
assert comm.allreduce(torch.tensor([1.0]), torch.distributed.ReduceOp.SUM).item() == size

# first dimension differing between ranks (rank r has r rows)
rows = comm.allgather_varying(torch.full((rank, 3), float(rank)))
assert [tuple(r.shape) for r in rows] == [(r, 3) for r in range(size)]
assert all(torch.all(r == i) for i, r in enumerate(rows))

# sparse: summed (or averaged) through gathered indices and values, never densified
dense = torch.zeros(6, 2)
dense[rank] = rank + 1.0
dense[5] = 1.0
summed = comm.allreduce_sparse(dense.to_sparse(1), "sum")
assert summed.is_sparse
want = torch.zeros(6, 2)
for r in range(size):
    want[r] += r + 1.0
want[5] = float(size)
assert torch.equal(summed.to_dense(), want)
assert torch.allclose(comm.allreduce_sparse(dense.to_sparse(1), "mean").to_dense(), want / size)

# point to point around a ring, blocking and not
right, left = (rank + 1) % size, (rank - 1) % size
send = torch.arange(5, dtype=torch.float64) + rank
handle = comm.isend(send, right, tag=7)
got = torch.empty(5, dtype=torch.float64)
status = comm.recv(got, source=left, tag=7)
handle.wait()
assert status.Get_source() == left and torch.equal(got, torch.arange(5, dtype=torch.float64) + left)
pending = comm.irecv(torch.empty(3, dtype=torch.int64), source=left, tag=8)
comm.send(torch.tensor([rank, rank, rank]), right, tag=8)
assert torch.equal(pending.wait(), torch.tensor([left] * 3))

# sub-communicators
half = comm.split(color=rank % 2)
assert half.size == len(range(rank % 2, size, 2))
assert half.allreduce(torch.tensor([1.0])).item() == half.size
assert comm.broadcast_object({"r": rank}, root=0) == {"r": 0}
assert comm.allgather_object(rank) == list(range(size))
comm.barrier()
print(f"rank {rank}: comm round trips OK")
