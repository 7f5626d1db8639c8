"""Pipeline bubbles: the measured idle fraction of the hybrid strategy's schedules against the
theory (P-1)/(M+P-1), for M micro-batches per step and P stages.

    python benchmarks/pipeline.py [--model cnn] [--nprocs 2] [--microbatches 1 2 4 8] [--quick]

All N processes form one pipeline (P = N stages, no data-parallel replicas), running ``gpipe``
and ``1f1b`` with each M, in one MPI job; each repetition runs every (schedule, M) once, in an
order rotated between repetitions. The bubble fraction of a process's step is its time not
spent computing a forward or backward pass (waiting for its neighbour, activations and their
gradients in flight included) over the step's time, as the strategy measures it
(``pipeline/bubble_measured``: mean over processes and over every step but the first). The
theory assumes stages of equal cost and free transfers, so measured / theory above 1 is the
price of unequal stages (the model is cut by parameter count, not by time) and of transfers.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # the repository first: benchmarks/strategies.py must not shadow the strategies package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import common  # noqa: E402

SCHEDULES = ("gpipe", "1f1b")


def parse_args(argv=None):
    p = common.parser(__doc__.splitlines()[0], nprocs=2, repeats=3)
    p.add_argument("--model", default="cnn", help="a model cut into pipeline stages, on its own dataset")
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--steps", type=int, help="timed steps per run (default 20, quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3, quick 1)")
    p.add_argument("--batch-size", type=int, help="per-pipeline batch size; default: the dataset's own, quick 16")
    args = common.parse(p, argv)
    args.steps = args.steps or (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.batch_size = args.batch_size or (16 if args.quick else None)
    if min(args.microbatches) < 1:
        p.error("--microbatches must be at least 1")
    return args


def theory(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)


def measure(workload, schedule: str, microbatches: int, args) -> dict:
    from benchmarks import harness
    from benchmarks import step_timer as st

    timer = st.StepTimer(args.warmup, align=True)
    trainer = harness.fit(
        workload,
        "hybrid",
        args.warmup + args.steps,
        [timer],
        strategy_settings={"pipeline_stages": args.nprocs, "microbatches": microbatches, "schedule": schedule},
    )
    summary = trainer.strategy.summary_metrics()
    per_rank = timer.gather()
    return {
        "bubble": summary["pipeline/bubble_measured"],
        "step_s": st.step_seconds(per_rank),
        "samples_per_s": st.samples_per_s(per_rank, samples_divisor=args.nprocs),
        "timeline": summary["pipeline/timelines"],
    }


def run(args) -> None:
    from benchmarks import harness
    from lightning_xd.comm.communicator import world

    harness.quiet()
    common.check_world(world(), args.nprocs, "pipeline")
    harness.share_cores()
    workload = harness.Workload.of(
        args.model, {"data_dir": args.data_dir, "cache_dir": args.cache_dir, "batch_size": args.batch_size}
    )
    workload.prepare()
    configs = [(s, m) for s in args.schedules for m in args.microbatches]
    runs: dict = {c: [] for c in configs}
    for repetition in range(args.repeats):
        shift = repetition % len(configs)
        for schedule, m in configs[shift:] + configs[:shift]:
            runs[(schedule, m)].append(measure(workload, schedule, m, args))
            if world().rank == 0:
                print(
                    f"{schedule:5} M={m}: bubble {runs[(schedule, m)][-1]['bubble']:.3f} "
                    f"(theory {theory(args.nprocs, m):.3f})",
                    flush=True,
                )
    if world().rank == 0:
        write(runs, workload, args)


def write(runs: dict, workload, args) -> None:
    stages = args.nprocs
    schedules = {s: {} for s in args.schedules}
    for (schedule, m), reps in runs.items():
        bubbles = [r["bubble"] for r in reps]
        schedules[schedule][str(m)] = {
            "bubble_measured": common.stats(bubbles),
            "bubble_theory": theory(stages, m),
            "measured_over_theory": common.ratio_stats(bubbles, [theory(stages, m)] * len(bubbles)),
            "step_s": common.stats(r["step_s"] for r in reps),
            "samples_per_s": common.stats(r["samples_per_s"] for r in reps),
        }
    result = {
        "machine": common.machine(),
        "model": workload.model,
        "data": workload.data,
        "stages": stages,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "quick": args.quick,
        "schedules": schedules,
        "repetitions": {
            f"{s} M={m}": [{k: v for k, v in r.items() if k != "timeline"} for r in reps]
            for (s, m), reps in runs.items()
        },
        "pipeline_bubble_measured_over_theory": {
            str(m): {s: schedules[s][str(m)]["measured_over_theory"]["median"] for s in args.schedules}
            for m in args.microbatches
        },
    }
    path = common.write_results(args.results_dir, common.result_name("pipeline", args.quick), result)
    example = max(args.microbatches, key=lambda m: (m <= 4, m))  # the timelines drawn: M = 4, or the nearest below
    plot(result, {s: runs[(s, example)][-1]["timeline"] for s in args.schedules}, example, path.with_suffix(".png"))
    print(f"wrote {path}", flush=True)


def plot(result: dict, timelines: dict, microbatches: int, path: Path) -> Path:
    from benchmarks import plots
    from lightning_xd.viz.charts import timeline_chart

    image = plots.canvas(1 + len(timelines), 1)
    ms = sorted(int(m) for m in next(iter(result["schedules"].values())))
    series = {
        f"{s} measured": (ms, [result["schedules"][s][str(m)]["bubble_measured"] for m in ms])
        for s in result["schedules"]
    }
    plain = {"theory (P-1)/(M+P-1)": (ms, [theory(result["stages"], m) for m in ms])}
    plots.range_lines(
        image,
        plots.panel(0, 0),
        series,
        f"bubble fraction, P = {result['stages']} stages",
        "micro-batches M",
        "fraction of step",
        plain,
    )
    for column, (schedule, timeline) in enumerate(timelines.items(), start=1):
        lanes = {
            f"rank {r}": [tuple(op) for op in ops] for r, ops in sorted(timeline.items(), key=lambda kv: int(kv[0]))
        }
        timeline_chart(image, plots.panel(column, 0), lanes, f"{schedule}, M = {microbatches}: one step")
    return plots.save(image, path, f"{result['model']} on {result['data']}; {common.machine_line(result['machine'])}")


if __name__ == "__main__":
    common.main(run, parse_args, __file__)
