"""Every benchmark, then ``summary.json`` (and ``summary.md``) with the headline ratios of this run.

    python benchmarks/run_all.py [--quick] [--data-dir DIR] [--results-dir DIR]

Benchmarks that run on the same number of processes share one MPI job (``benchmarks/job.py``):
2 processes: allreduce, strategies, pipeline, checkpoint; 3: straggler; 4 (oversubscribed on
fewer cores; not with ``--quick``): allreduce. Each writes its own ``<name>[-quick].json`` and PNG;
the summary is read from the files this invocation wrote, so every ratio in it comes from one run
(``--quick``: ``summary-quick.json``, beside the quick results, so a check never overwrites figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the repository first: benchmarks/strategies.py must not shadow the strategies package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import common  # noqa: E402

JOB = str(Path(__file__).with_name("job.py"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="every benchmark's quick mode: seconds, checks the scripts")
    p.add_argument("--data-dir", default=os.environ.get("XD_DATA_DIR", "./data"), help="datasets ($XD_DATA_DIR)")
    p.add_argument("--cache-dir", default=os.environ.get("XD_CACHE_DIR"), help="preprocessed data ($XD_CACHE_DIR)")
    p.add_argument("--results-dir", default=str(common.RESULTS))
    p.add_argument("--timeout", type=float, default=None, help="seconds each MPI job may take (default: no limit)")
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: rebuild the summary from the results there are (after re-running one benchmark)",
    )
    return p.parse_args(argv)


def jobs(args) -> list[tuple[int, list[list[str]]]]:
    """(processes, benchmark segments) of every MPI job, in the order they run."""
    shared = ["--results-dir", args.results_dir] + (["--quick"] if args.quick else [])
    data = ["--data-dir", args.data_dir] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    two = [["allreduce", "--nprocs", "2", *shared]] + [
        [name, "--nprocs", "2", *shared, *data] for name in ("strategies", "pipeline", "checkpoint")
    ]
    planned = [(2, two), (3, [["straggler", "--nprocs", "3", *shared, *data]])]
    if not args.quick:
        planned.append((4, [["allreduce", "--nprocs", "4", *shared]]))
    return planned


def read(results_dir: Path, name: str, quick: bool) -> dict:
    return json.loads((results_dir / f"{common.result_name(name, quick)}.json").read_text())


def summary(results_dir: Path, quick: bool) -> dict:
    """The headline figures (medians; their min and max under ``ranges``), each from one results file."""
    allreduce, strategies = read(results_dir, "allreduce-2ranks", quick), read(results_dir, "strategies", quick)
    straggler, pipeline = read(results_dir, "straggler", quick), read(results_dir, "pipeline", quick)
    checkpoint = read(results_dir, "checkpoint", quick)
    rows = {r["bytes"]: r for r in allreduce["rows"]}
    mpi_over_ddp = strategies["mpi_over_ddp_samples_per_s"]
    row3x = next(r for r in straggler["rows"] if r["factor"] == 3.0)
    ranges = {
        "mpi_over_ddp_samples_per_s": mpi_over_ddp,
        "comm_over_raw_mpi_busbw_1MB": rows[1 << 20]["comm_over_raw_mpi_busbw"],
        "comm_over_raw_mpi_busbw_64MB": rows[64 << 20]["comm_over_raw_mpi_busbw"],
        "raw_mpi_busbw_over_memcpy_64MB": allreduce["raw_mpi_busbw_over_memcpy_largest"],
        "async_over_mpi_updates_per_s_straggler3x": row3x["async_over_mpi_updates_per_s"],
        "pipeline_bubble_measured_over_theory": {
            m: {s: pipeline["schedules"][s][m]["measured_over_theory"] for s in pipeline["schedules"]}
            for m in pipeline["pipeline_bubble_measured_over_theory"]
        },
        "checkpoint_overhead_pct": {m: r["overhead_pct"] for m, r in checkpoint["models"].items()},
        "mpi_communication_hidden_by_overlap": {
            m: r["hidden_communication_share"]
            for m, r in strategies["models"].items()
            if r.get("hidden_communication_share")
        },
    }
    result = {key: medians(value) for key, value in ranges.items()}
    result.update(
        machine={k: allreduce["machine"][k] for k in ("cores", "cpu_model", "torch", "python")},
        quick=quick,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        ranges=ranges,
        checks={
            "mpi_at_least_as_fast_as_ddp": {m: r["median"] >= 1.0 for m, r in mpi_over_ddp.items()},
            "comm_layer_at_least_90pct_of_raw_mpi_from_1MB": allreduce["comm_layer_at_least_90pct_of_raw_mpi_from_1MB"],
        },
        scaling_efficiency={
            m: {s: e["median"] for s, e in r.get("scaling_efficiency", {}).items()}
            for m, r in strategies["models"].items()
        },
    )
    four = results_dir / f"{common.result_name('allreduce-4ranks', quick)}.json"
    if four.is_file():
        result["comm_over_raw_mpi_busbw_4ranks"] = json.loads(four.read_text())["comm_over_raw_mpi_busbw"]
    return result


def medians(value):
    """A {median, min, max} figure as its median; objects of figures keep their keys."""
    if isinstance(value, dict) and "median" in value:
        return value["median"]
    return {k: medians(v) for k, v in value.items()}


def markdown(result: dict) -> str:
    """summary.md: one table row per figure, generated from summary.json."""
    lines = [
        f"# Benchmark summary{' (quick)' if result['quick'] else ''}",
        "",
        f"{result['machine']['cores']} cores, {result['machine']['cpu_model']}, torch "
        f"{result['machine']['torch']}; {result['created']}. Medians of repetitions, min and max of the "
        "per-repetition values; every ratio within this run.",
        "",
        "| figure | median | min | max |",
        "|---|---|---|---|",
    ]

    def rows(name: str, value) -> None:
        if isinstance(value, dict) and "median" in value:
            lines.append(f"| {name} | {value['median']:.3f} | {value['min']:.3f} | {value['max']:.3f} |")
        else:
            for key, inner in value.items():
                rows(f"{name} [{key}]", inner)

    for key, value in result["ranges"].items():
        rows(f"`{key}`", value)
    lines += ["", "Checks: " + json.dumps(result["checks"], sort_keys=True), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    for nprocs, segments in [] if args.summary_only else jobs(args):
        names = ", ".join(segment[0] for segment in segments)
        print(f"== {nprocs} processes: {names}", flush=True)
        try:
            code = common.mpirun(
                nprocs, [JOB, *[t for segment in segments for t in ["--", *segment]][1:]], timeout=args.timeout
            )
        except common.BenchmarkError as err:
            code = str(err)
        if code != 0:
            print(f"error: the {nprocs}-process benchmarks ({names}) failed ({code}); see above", file=sys.stderr)
            return 1
    results_dir = Path(args.results_dir)
    result = summary(results_dir, args.quick)
    path = common.write_results(results_dir, common.result_name("summary", args.quick), result)
    path.with_suffix(".md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in result if k not in ("ranges",)}, indent=2, sort_keys=True))
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
