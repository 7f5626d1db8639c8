"""Strategies side by side: samples/s, time per step split into compute / communication / idle,
and scaling efficiency from 1 to N processes, for the same model, data and batch size.

    python benchmarks/strategies.py [--models cnn gcn] [--nprocs 2] [--repeats 5] [--quick]

Everything runs in one MPI job of N processes (default 2): for each model, ``single`` on rank 0
alone (the others wait without taking a core; it gets all the cores, as train.py gives one
process), then ``ddp``, ``mpi``, ``async`` and ``hybrid`` on all N (each process a 1/N share of the
cores), and ``mpi_no_overlap``: ``mpi`` with its buckets started only after backward (``overlap=False``),
to measure how much of ``mpi``'s communication its overlap with backward hides. Each repetition runs
every strategy once, in an order rotated between repetitions, so
drifting machine load does not favour one. Every strategy uses the model's default dataset and
the same per-process batch size. A strategy that cannot run the model (``hybrid`` needs a model
cut into pipeline stages) is recorded as not applicable, with the reason.

Per step (Lightning hooks, ``benchmarks/step_timer.py``), medians over the timed steps:
- step: ``on_train_batch_start`` to ``on_train_batch_end`` on each process, averaged over them.
- compute: forward, backward and optimizer step without communication. ``ddp`` and ``mpi``: the
  step time of steps run with the gradient exchange switched off by the strategy's own
  ``block_backward_sync()``, interleaved with the normal steps. ``async``: the time to
  ``on_before_optimizer_step`` (forward and backward; the optimizer step is the server's).
  ``hybrid``: the step minus its idle time. ``single``: the whole step.
- idle: waiting for others. ``ddp``/``mpi``: the slowest process's exchange-off step minus the
  mean one (load imbalance). ``hybrid``: the measured pipeline bubble x step (waiting for the
  neighbouring stage, activation transfers included). ``async``: not separable from its
  communication by hooks (null).
- communication: what the exchange adds. ``ddp``/``mpi``: step - compute - idle (transfers and
  copies that overlap with backward did not hide). ``async``: push, the server's update and pull
  (``on_before_optimizer_step`` to the step's end). ``hybrid``: inside idle (null).
samples/s: the training samples of all processes over the slowest process's time in timed steps
(a pipeline's stages read the same samples: counted once). Scaling efficiency: a strategy's
samples/s over N x ``single``'s, in the same run. Hidden communication share: per repetition,
1 - communication of ``mpi`` / communication of ``mpi_no_overlap`` (the same exchange, not overlapped).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # the repository first: this file must not shadow the strategies package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import common  # noqa: E402

STRATEGIES_COMPARED = ("single", "ddp", "mpi", "mpi_no_overlap", "async", "hybrid")
SPLIT = {
    "single": "local",
    "ddp": "switch",
    "mpi": "switch",
    "mpi_no_overlap": "switch",
    "async": "optimizer_step",
    "hybrid": "bubble",
}
VARIANTS = {"mpi_no_overlap": ("mpi", {"overlap": False})}  # name -> (strategy, its settings)
PARTS = ("compute_s", "communication_s", "idle_s")


def strategy_of(name: str) -> tuple[str, dict]:
    return VARIANTS.get(name, (name, {}))


def parse_args(argv=None):
    p = common.parser(__doc__.splitlines()[0], nprocs=2)
    p.add_argument("--models", nargs="+", default=["cnn", "gcn"], help="each on its own default dataset")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES_COMPARED))
    p.add_argument(
        "--steps",
        type=int,
        help="timed steps per run (default 30, quick 3); ddp and mpi run as many again with the exchange off",
    )
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5, quick 1)")
    p.add_argument("--batch-size", type=int, help="per-process batch size; default: each dataset's own, quick 16")
    args = common.parse(p, argv)
    args.batch_size = args.batch_size or (16 if args.quick else None)
    args.steps = args.steps or (3 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    unknown = sorted(set(args.strategies) - set(SPLIT))
    if unknown:
        p.error(f"unknown strategy {', '.join(unknown)}; compared here: {', '.join(STRATEGIES_COMPARED)}")
    return args


def not_applicable(workload, name: str, nprocs: int):
    """Why ``name`` cannot run ``workload`` on ``nprocs`` processes (the strategy's own check, as
    train.py asks it before starting a job), or None."""
    from lightning_xd.errors import UserError
    from lightning_xd.launch.registry import DATAMODULES
    from lightning_xd.launch.runner import check_strategy_settings

    datamodule = DATAMODULES.build(workload.data, workload.settings)
    try:
        check_strategy_settings(strategy_of(name)[0], nprocs, workload.model, datamodule, workload.settings)
    except UserError as err:
        return str(err)
    return None


def split(method: str, per_rank, step_s: float, trainer) -> dict:
    """Compute / communication / idle of one run, by the strategy's method (see the module docstring)."""
    from benchmarks import step_timer as st

    if method == "local":
        return {"compute_s": step_s, "communication_s": 0.0, "idle_s": 0.0}
    if method == "switch":
        compute, idle = st.step_seconds(per_rank, exchange=False), st.wait_for_slowest(per_rank)
        return {"compute_s": compute, "idle_s": idle, "communication_s": max(0.0, step_s - compute - idle)}
    if method == "optimizer_step":
        compute = st.median(sum(s.before_optimizer_s for s in step) / len(step) for step in st.by_index(per_rank, True))
        return {"compute_s": compute, "communication_s": max(0.0, step_s - compute), "idle_s": None}
    bubble = trainer.strategy.summary_metrics()["pipeline/bubble_measured"]
    return {"compute_s": step_s * (1 - bubble), "communication_s": None, "idle_s": step_s * bubble, "bubble": bubble}


def measure(workload, name: str, args) -> dict:
    """One run of one strategy: timed steps, then the figures of that run."""
    from benchmarks import harness
    from benchmarks import step_timer as st
    from lightning_xd.comm.communicator import world
    from lightning_xd.contract import declared

    processes = 1 if name == "single" else world().size
    threads = harness.share_cores(alone=name == "single")
    method = SPLIT[name]
    timer = st.StepTimer(args.warmup, switch_exchange_off=method == "switch", align=method in ("switch", "bubble"))
    steps = args.warmup + args.steps * (2 if method == "switch" else 1)
    strategy, settings = strategy_of(name)
    trainer = harness.fit(workload, strategy, steps, [timer], strategy_settings=settings)
    per_rank = [timer.steps] if processes == 1 else timer.gather()
    step_s = st.step_seconds(per_rank)
    divisor = declared(trainer.strategy).batch_sharing_processes
    return {
        "samples_per_s": st.samples_per_s(per_rank, divisor),
        "step_s": step_s,
        **split(method, per_rank, step_s, trainer),
        "processes": processes,
        "threads_per_process": threads,
        "samples_per_step": sum(s.samples for steps in per_rank for s in steps if s.exchange)
        / divisor
        / max(1, len(st.by_index(per_rank, True))),
        "timed_steps": len(st.by_index(per_rank, True)),
    }


def compare(workload, args) -> dict:
    """Every strategy on ``workload``, ``repeats`` times in rotated order; medians, min and max."""
    from benchmarks import harness
    from lightning_xd.comm.communicator import world

    workload.prepare()
    skipped = {
        name: reason
        for name in args.strategies
        if (reason := not_applicable(workload, name, 1 if name == "single" else args.nprocs))
    }
    names = [n for n in args.strategies if n not in skipped]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for repetition in range(args.repeats):
        for name in names[repetition % len(names) :] + names[: repetition % len(names)]:
            if name == "single":
                # B023: the lambda is called at once, inside the loop, so it sees this loop's name
                runs[name].append(harness.on_first_rank(lambda: measure(workload, name, args)))  # noqa: B023
            else:
                runs[name].append(measure(workload, name, args))
            if world().rank == 0:
                r = runs[name][-1]
                print(
                    f"{workload.model} {name:14} repetition {repetition + 1}/{args.repeats}: "
                    f"{r['samples_per_s']:9.1f} samples/s, step {1e3 * r['step_s']:7.2f} ms",
                    flush=True,
                )
    return summarize(runs, skipped, workload, args)


def summarize(runs: dict, skipped: dict, workload, args) -> dict:
    figures = {
        name: {
            key: common.stats(r[key] for r in reps) if reps[0][key] is not None else None
            for key in ("samples_per_s", "step_s", *PARTS)
        }
        | {
            "processes": reps[0]["processes"],
            "threads_per_process": reps[0]["threads_per_process"],
            "samples_per_step": reps[0]["samples_per_step"],
            "split_method": SPLIT[name],
        }
        for name, reps in runs.items()
    }
    for name, reps in runs.items():
        if "bubble" in reps[0]:
            figures[name]["bubble"] = common.stats(r["bubble"] for r in reps)
    throughput = {name: [r["samples_per_s"] for r in reps] for name, reps in runs.items()}
    result = {
        "data": workload.data,
        "settings": {k: v for k, v in workload.settings.items() if k != "cache_dir"},
        "strategies": figures,
        "not_applicable": skipped,
        "repetitions": runs,
    }
    if "single" in throughput:
        result["scaling_efficiency"] = {
            name: common.ratio_stats(values, [figures[name]["processes"] * v for v in throughput["single"]])
            for name, values in throughput.items()
            if name != "single"
        }
    if "mpi" in throughput and "ddp" in throughput:
        result["mpi_over_ddp_samples_per_s"] = common.ratio_stats(throughput["mpi"], throughput["ddp"])
    if "mpi" in runs and "mpi_no_overlap" in runs:
        result["hidden_communication_share"] = hidden_share(runs["mpi"], runs["mpi_no_overlap"])
    return result


def hidden_share(overlapped: list[dict], after_backward: list[dict]) -> dict | None:
    """Per repetition, the share of the exchange's cost that overlapping it with backward hid."""
    shares = [
        1 - a["communication_s"] / b["communication_s"]
        for a, b in zip(overlapped, after_backward)
        if b["communication_s"] > 0
    ]
    return common.stats(shares) if shares else None


def plot(result: dict, path: Path) -> Path:
    from benchmarks import plots

    models = list(result["models"])
    image = plots.canvas(2, len(models))
    for row, model in enumerate(models):
        figures = result["models"][model]["strategies"]
        names = sorted(figures, key=lambda n: STRATEGIES_COMPARED.index(n))
        plots.range_bars(
            image,
            plots.panel(0, row),
            names,
            [figures[n]["samples_per_s"] for n in names],
            f"{model} on {result['models'][model]['data']}, {result['nprocs']} processes",
            "samples/s",
        )
        parts = {
            p.removesuffix("_s"): [1e3 * figures[n][p]["median"] if figures[n][p] else None for n in names]
            for p in PARTS
        }
        plots.stacked_bars(image, plots.panel(1, row), names, parts, f"{model}: time per step (medians)", "ms")
    return plots.save(image, path, common.machine_line(result["machine"]))


def run(args) -> None:
    from benchmarks import harness
    from lightning_xd.comm.communicator import world

    harness.quiet()
    common.check_world(world(), args.nprocs, "strategies")
    settings = {"data_dir": args.data_dir, "cache_dir": args.cache_dir, "batch_size": args.batch_size}
    models = {}
    for model in args.models:
        models[model] = compare(harness.Workload.of(model, settings), args)
    if world().rank == 0:
        result = {
            "machine": common.machine(),
            "nprocs": args.nprocs,
            "repeats": args.repeats,
            "steps": args.steps,
            "warmup": args.warmup,
            "quick": args.quick,
            "models": models,
            "mpi_over_ddp_samples_per_s": {
                m: r["mpi_over_ddp_samples_per_s"] for m, r in models.items() if "mpi_over_ddp_samples_per_s" in r
            },
        }
        path = common.write_results(args.results_dir, common.result_name("strategies", args.quick), result)
        plot(result, path.with_suffix(".png"))
        for model, ratio in result["mpi_over_ddp_samples_per_s"].items():
            print(
                f"{model}: mpi / ddp samples/s = {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f})"
            )
        for model, figures in models.items():
            if figures.get("hidden_communication_share"):
                share = figures["hidden_communication_share"]
                print(
                    f"{model}: communication hidden by overlap = {share['median']:.2f} "
                    f"(min {share['min']:.2f}, max {share['max']:.2f})"
                )
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    common.main(run, parse_args, __file__)
