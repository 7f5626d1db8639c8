"""Several benchmarks in one MPI job, one after another, so that they pay MPI and torch start-up once.

    mpirun -np 2 python -m mpi4py benchmarks/job.py allreduce --quick -- strategies --quick

Each segment, separated by ``--``, is a benchmark's name and its flags. Every flag of every segment
is checked before the first benchmark starts; then every process runs the benchmarks' ``run(args)``
in the order given. ``run_all.py`` starts these jobs.
"""

from __future__ import annotations

import gc
import importlib
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the repository first: benchmarks/strategies.py must not shadow the strategies package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import common  # noqa: E402
from lightning_xd.comm.environment import is_first_process  # noqa: E402

BENCHMARKS = ("allreduce", "strategies", "pipeline", "checkpoint", "straggler")


def segments(argv: list[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for token in argv:
        if token == "--":
            parts.append([])
        else:
            parts[-1].append(token)
    return [part for part in parts if part]


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    planned = []
    for name, *flags in segments(argv):
        if name not in BENCHMARKS:
            raise common.BenchmarkError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
        module = importlib.import_module(f"benchmarks.{name}")
        planned.append((module, module.parse_args(flags)))
    for module, args in planned:
        started = time.perf_counter()
        module.run(args)
        gc.collect()  # the previous benchmark's models and trainers go before the next one measures
        if is_first_process():
            print(f"-- {module.__name__.split('.')[-1]} took {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except common.BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
