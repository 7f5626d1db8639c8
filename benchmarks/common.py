"""Shared by the benchmark scripts: their common flags, re-running under mpirun, statistics of
repetitions, the machine description and the results files.

Every script runs alone (``python benchmarks/NAME.py [--quick]``): started outside an MPI job it
re-runs itself under ``mpirun -np N``; inside one it measures. ``run_all.py`` instead runs several
scripts' ``run(args)`` inside one job, so that each pays MPI and torch start-up once.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


class BenchmarkError(Exception):
    """A mistake in the benchmark's flags or set-up: reported as one line, exit code 2."""


def parser(
    description: str, nprocs: int, data: bool = True, repeats: int = 5, quick_repeats: int = 2
) -> argparse.ArgumentParser:
    """The flags every benchmark takes; a script adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions: seconds, checks the script")
    p.add_argument("--nprocs", type=int, default=nprocs, help="processes of the MPI job")
    p.add_argument(
        "--repeats", type=int, help=f"repetitions behind every median (default: {repeats}, quick: {quick_repeats})"
    )
    p.set_defaults(full_repeats=repeats, quick_repeats=quick_repeats)
    p.add_argument("--results-dir", default=str(RESULTS), help="where <name>[-quick].json and .png go")
    if data:
        p.add_argument(
            "--data-dir",
            default=os.environ.get("XD_DATA_DIR", "./data"),
            help="datasets, laid out as ../shared/data ($XD_DATA_DIR)",
        )
        p.add_argument("--cache-dir", default=os.environ.get("XD_CACHE_DIR"), help="preprocessed data ($XD_CACHE_DIR)")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = args.quick_repeats if args.quick else args.full_repeats
    if args.repeats < 1 or args.nprocs < 1:
        p.error("--repeats and --nprocs must be at least 1")
    return args


def result_name(name: str, quick: bool) -> str:
    return name + ("-quick" if quick else "")


def main(
    run: Callable[[argparse.Namespace], None], parse_args: Callable[[Sequence[str]], argparse.Namespace], script: str
) -> None:
    """Measure inside an MPI job; outside one, re-run ``script`` under mpirun with the same flags."""
    argv = sys.argv[1:]
    args = parse_args(argv)
    from lightning_xd.comm.environment import in_mpi_job

    try:
        if in_mpi_job():
            run(args)
            return
        sys.exit(mpirun(args.nprocs, [script, *argv]))
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def mpirun(nprocs: int, script_argv: Sequence[str], timeout: float | None = None) -> int:
    """Run ``python -m mpi4py SCRIPT ARGS`` on ``nprocs`` ranks (oversubscribed beyond the cores).
    Past ``timeout`` seconds mpirun is asked to end the job (SIGTERM: it stops its ranks; a SIGKILL
    would leave them running), then killed."""
    from lightning_xd.launch.launcher import mpirun_command, mpirun_environment

    env = mpirun_environment()
    process = subprocess.Popen(mpirun_command(nprocs, list(script_argv), env=env), env=env)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise BenchmarkError(f"the {nprocs}-process job ran longer than {timeout:.0f} s and was stopped") from None


def check_world(comm, nprocs: int, name: str) -> None:
    if comm.size != nprocs:
        raise BenchmarkError(
            f"{name} wants --nprocs {nprocs} but this MPI job has {comm.size} processes; "
            f"start it without mpirun, or with mpirun -np {nprocs}"
        )


def stats(values: Iterable[float]) -> dict:
    """Median, min and max of repetitions (the form every figure takes in the results)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio_stats(numerators: Sequence[float], denominators: Sequence[float]) -> dict:
    """A ratio of two quantities measured in the same repetitions: the ratio of their medians, with
    the spread of the per-repetition ratios as min and max."""
    per_repetition = [a / b for a, b in zip(numerators, denominators) if b]
    return {
        "median": statistics.median(numerators) / statistics.median(denominators),
        "min": min(per_repetition),
        "max": max(per_repetition),
        "n": len(per_repetition),
    }


def machine() -> dict:
    """Cores and CPU model: recorded next to every figure."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
    }


def machine_line(info: dict) -> str:
    return f"{info['cores']} cores, {info['cpu_model']}, torch {info['torch']}"


def write_results(results_dir: str | Path, name: str, content: dict) -> Path:
    """``<results_dir>/<name>.json``, written atomically: a reader never sees half a file."""
    from lightning_xd.files import write_json_atomically

    return write_json_atomically(Path(results_dir) / f"{name}.json", content)


@contextmanager
def torch_distributed_left_as_found():
    """A run that starts torch.distributed (DDP) ends it again. Lightning broadcasts a flag over
    torch.distributed before every training step whenever it is initialised, whatever the strategy:
    left behind, it would add a gloo broadcast to every later run's steps, and hang the async
    strategy, whose server takes no steps."""
    import torch.distributed as dist

    started_here = not dist.is_initialized()
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    try:
        yield
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()
            for key, value in saved.items():  # the next run picks a fresh rendezvous port
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
