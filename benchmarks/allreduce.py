"""Allreduce bandwidth: raw mpi4py on numpy, our comm layer on torch tensors, torch.distributed gloo.

    python benchmarks/allreduce.py [--nprocs 2] [--quick]

Bus bandwidth = 2(N-1)/N x bytes / time (the traffic a ring allreduce puts on each link). A
memory-copy bandwidth measured on the same machine is the physical limit of shared-memory
transport. Every figure is the median of ``--repeats`` timed runs (min and max kept); ratios are
taken within the run. Re-runs itself under mpirun when started outside an MPI job.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def timed(operation, repeats: int, barrier) -> dict:
    """Seconds per operation: warm up, then ``repeats`` timings of enough calls to last ~50 ms."""
    operation()
    barrier()
    start = time.perf_counter()
    operation()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, min(200, int(0.05 / once)))
    samples = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        for _ in range(calls):
            operation()
        samples.append((time.perf_counter() - start) / calls)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def memcpy_bandwidth(nbytes: int, repeats: int) -> dict:
    import numpy as np

    src, dst = np.ones(nbytes // 4, np.float32), np.empty(nbytes // 4, np.float32)
    seconds = timed(lambda: np.copyto(dst, src), repeats, lambda: None)
    return {k: nbytes / v for k, v in seconds.items()}  # bytes copied per second


def run(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from lightning_xd.comm import world
    from lightning_xd.environment import MPIEnvironment
    from mpi4py import MPI

    comm = world()
    n = comm.size
    torch.set_num_threads(1)
    env = MPIEnvironment(comm)
    os.environ.update(MASTER_ADDR=env.main_address, MASTER_PORT=str(env.main_port))
    dist.init_process_group("gloo", rank=comm.rank, world_size=n)
    sizes = [s for s in SIZES if s <= (1 << 20 if args.quick else SIZES[-1])]
    rows = []
    for nbytes in sizes:
        count = nbytes // 4
        raw = np.ones(count, np.float32)
        ours = torch.ones(count)
        gloo = torch.ones(count)
        row = {"bytes": nbytes}
        for name, operation in [("raw_mpi", lambda: comm.mpi.Allreduce(MPI.IN_PLACE, raw, MPI.SUM)),
                                ("comm_layer", lambda: comm.allreduce(ours, "sum")),
                                ("gloo", lambda: dist.all_reduce(gloo))]:
            seconds = timed(operation, args.repeats, comm.barrier)
            factor = 2 * (n - 1) / n * nbytes
            row[name] = {"seconds": seconds, "busbw": {k: factor / seconds[j] for k, j in
                                                       (("median", "median"), ("min", "max"), ("max", "min"))}}
        rows.append(row)
        if comm.rank == 0:
            print(f"{nbytes / 1024:>8.0f} KiB  raw MPI {row['raw_mpi']['busbw']['median'] / 1e9:6.2f} GB/s  "
                  f"comm layer {row['comm_layer']['busbw']['median'] / 1e9:6.2f} GB/s  "
                  f"gloo {row['gloo']['busbw']['median'] / 1e9:6.2f} GB/s", flush=True)
    dist.destroy_process_group()
    if comm.rank == 0:
        from common import machine, write_results

        memcpy = memcpy_bandwidth(sizes[-1], args.repeats)
        ratio = {r["bytes"]: r["comm_layer"]["busbw"]["median"] / r["raw_mpi"]["busbw"]["median"] for r in rows}
        result = {"machine": machine(), "ranks": n, "repeats": args.repeats, "rows": rows,
                  "memcpy_bytes_per_s": memcpy, "comm_over_raw_mpi_busbw": {str(k): v for k, v in ratio.items()},
                  "raw_mpi_busbw_over_memcpy_largest": rows[-1]["raw_mpi"]["busbw"]["median"] / memcpy["median"]}
        name = f"allreduce-{n}ranks" + ("-quick" if args.quick else "")
        path = write_results(name, result)
        plot(result, path.with_suffix(".png"))
        print(f"memcpy {memcpy['median'] / 1e9:.2f} GB/s; wrote {path}")


def plot(result: dict, path: Path) -> None:
    import math

    import cv2
    import numpy as np

    from lightning_xd.viz.charts import WHITE, line_chart

    xs = [math.log2(r["bytes"] / 1024) for r in result["rows"]]
    series = {name: (xs, [r[name]["busbw"]["median"] / 1e9 for r in result["rows"]])
              for name in ("raw_mpi", "comm_layer", "gloo")}
    series["memcpy (limit)"] = (xs, [result["memcpy_bytes_per_s"]["median"] / 1e9] * len(xs))
    image = np.full((420, 760, 3), WHITE, np.uint8)
    line_chart(image, (4, 4, 752, 412), series, f"allreduce bus bandwidth, {result['ranks']} ranks",
               "message size, log2(KiB)", "GB/s")
    cv2.imwrite(str(path), image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="up to 1 MiB, 3 repeats: seconds")
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 3)
    from lightning_xd.launcher import in_mpi_job, mpirun_command, mpirun_environment

    if in_mpi_job():
        run(args)
        return
    import subprocess

    cmd = mpirun_command(args.nprocs, [__file__, *sys.argv[1:]])
    sys.exit(subprocess.run(cmd, env=mpirun_environment()).returncode)


if __name__ == "__main__":
    main()
