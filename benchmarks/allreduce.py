"""Allreduce bandwidth: raw mpi4py on numpy, our comm layer on torch tensors, torch.distributed gloo.

    python benchmarks/allreduce.py [--nprocs 2] [--quick]

Bus bandwidth = 2(N-1)/N x bytes / time (the traffic a ring allreduce puts on each link). A
memory-copy bandwidth measured on the same machine (numpy ``copyto`` of the largest message) is
the physical limit of shared-memory transport. Every figure is the median of ``--repeats`` timed
runs (min and max kept); ratios are taken within the run. Sizes run from 4 KiB to 64 MiB
(``--quick``: 4 KiB, 64 KiB, 1 MiB and 64 MiB, 3 repeats); 1 MB here means 2^20 bytes.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the repository first: benchmarks/strategies.py must not shadow the strategies package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import common  # noqa: E402

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 64 << 10, 1 << 20, 64 << 20]
BACKENDS = ("raw_mpi", "comm_layer", "gloo")


def parse_args(argv=None):
    args = common.parse(common.parser(__doc__.splitlines()[0], nprocs=2, data=False, repeats=7, quick_repeats=3), argv)
    args.sizes = QUICK_SIZES if args.quick else SIZES
    return args


def timed(operation, repeats: int, comm=None) -> dict:
    """Seconds per operation: warm up, then ``repeats`` timings of enough calls to last ~50 ms.
    With ``comm``, every rank makes as many calls as the slowest one asks for (a collective called
    a different number of times on different ranks would hang) and every timing starts at a barrier."""
    barrier = comm.barrier if comm is not None else lambda: None
    operation()
    barrier()
    start = time.perf_counter()
    operation()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, min(200, int(0.05 / once)))
    if comm is not None:
        calls = min(comm.allgather_object(calls))
    samples = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        for _ in range(calls):
            operation()
        samples.append((time.perf_counter() - start) / calls)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def memcpy_bandwidth(nbytes: int, repeats: int) -> dict:
    import numpy as np

    src, dst = np.ones(nbytes // 4, np.float32), np.empty(nbytes // 4, np.float32)
    seconds = timed(lambda: np.copyto(dst, src), repeats)
    return bandwidth(nbytes, seconds)  # bytes copied per second


def bandwidth(nbytes: float, seconds: dict) -> dict:
    """Bytes per second of each timing: the fastest time is the highest bandwidth."""
    return {
        "median": nbytes / seconds["median"],
        "min": nbytes / seconds["max"],
        "max": nbytes / seconds["min"],
        "samples": [nbytes / s for s in seconds["samples"]],
    }


def gloo_group(comm):
    """torch.distributed over gloo on the job's processes (the one already there, if any)."""
    import torch.distributed as dist

    from lightning_xd.comm.environment import MPIEnvironment

    if not dist.is_initialized():
        env = MPIEnvironment(comm)
        os.environ.update(MASTER_ADDR=env.main_address, MASTER_PORT=str(env.main_port))
        dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    return dist


def measure_size(comm, dist, nbytes: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from mpi4py import MPI

    count = nbytes // 4
    raw, ours, gloo = np.ones(count, np.float32), torch.ones(count), torch.ones(count)
    operations = {
        "raw_mpi": lambda: comm.mpi.Allreduce(MPI.IN_PLACE, raw, MPI.SUM),
        "comm_layer": lambda: comm.allreduce(ours, "sum"),
        "gloo": lambda: dist.all_reduce(gloo),
    }
    bus_bytes = 2 * (comm.size - 1) / comm.size * nbytes
    row = {"bytes": nbytes}
    for name in BACKENDS:
        seconds = timed(operations[name], repeats, comm)
        row[name] = {"seconds": seconds, "busbw": bandwidth(bus_bytes, seconds)}
    row["comm_over_raw_mpi_busbw"] = common.ratio_stats(
        row["comm_layer"]["busbw"]["samples"], row["raw_mpi"]["busbw"]["samples"]
    )
    return row


def run(args) -> None:
    import torch

    from lightning_xd.comm.communicator import world

    comm = world()
    common.check_world(comm, args.nprocs, "allreduce")
    torch.set_num_threads(1)
    rows = []
    with common.torch_distributed_left_as_found():
        dist = gloo_group(comm)
        for nbytes in args.sizes:
            rows.append(measure_size(comm, dist, nbytes, args.repeats))
            if comm.rank == 0:
                print(
                    f"{nbytes / 1024:>8.0f} KiB  "
                    + "  ".join(f"{name} {rows[-1][name]['busbw']['median'] / 1e9:6.2f} GB/s" for name in BACKENDS),
                    flush=True,
                )
    if comm.rank == 0:
        write(rows, memcpy_bandwidth(args.sizes[-1], args.repeats), comm.size, args)


def write(rows: list[dict], memcpy: dict, ranks: int, args) -> None:
    largest = rows[-1]
    from_1mb = [r["comm_over_raw_mpi_busbw"]["median"] for r in rows if r["bytes"] >= 1 << 20]
    result = {
        "machine": common.machine(),
        "ranks": ranks,
        "repeats": args.repeats,
        "quick": args.quick,
        "rows": rows,
        "memcpy_bytes_per_s": memcpy,
        "memcpy_bytes": largest["bytes"],
        "comm_over_raw_mpi_busbw": {str(r["bytes"]): r["comm_over_raw_mpi_busbw"]["median"] for r in rows},
        "raw_mpi_busbw_over_memcpy_largest": common.ratio_stats(
            largest["raw_mpi"]["busbw"]["samples"], memcpy["samples"]
        ),
        "comm_layer_at_least_90pct_of_raw_mpi_from_1MB": bool(from_1mb) and min(from_1mb) >= 0.9,
    }
    path = common.write_results(args.results_dir, common.result_name(f"allreduce-{ranks}ranks", args.quick), result)
    plot(result, path.with_suffix(".png"))
    print(f"memcpy {memcpy['median'] / 1e9:.2f} GB/s; wrote {path}", flush=True)


def gigabytes(figure: dict) -> dict:
    return {k: figure[k] / 1e9 for k in ("median", "min", "max")}


def plot(result: dict, path: Path) -> Path:
    import math

    from benchmarks import plots

    xs = [math.log2(r["bytes"] / 1024) for r in result["rows"]]
    series = {name: (xs, [gigabytes(r[name]["busbw"]) for r in result["rows"]]) for name in BACKENDS}
    limit = {"memcpy (limit)": (xs, [result["memcpy_bytes_per_s"]["median"] / 1e9] * len(xs))}
    image = plots.canvas(1, 1)
    plots.range_lines(
        image,
        plots.panel(0, 0),
        series,
        f"allreduce bus bandwidth, {result['ranks']} ranks",
        "message size, log2(KiB)",
        "GB/s",
        limit,
    )
    return plots.save(image, path, common.machine_line(result["machine"]))


if __name__ == "__main__":
    common.main(run, parse_args, __file__)
