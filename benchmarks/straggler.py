"""One worker slowed down: updates/s and time-to-accuracy of ``async`` against ``mpi``, in one run.

    python benchmarks/straggler.py [--model gcn] [--nprocs 3] [--factors 1.5 2 3] [--quick]

One MPI job of N processes (default 3: for ``async`` a server and two workers). Each repetition
first trains ``mpi`` undisturbed; its median step time s sets the delays: slowed "by a factor f",
the last rank (a worker in both strategies) sleeps (f - 1) x s after each of its steps
(train.py's ``--straggler-delay``). Then, for every f, ``mpi`` and ``async`` (staleness bound
``--staleness``) train the same epochs, in an order alternated between repetitions.
- updates/s: optimizer updates (``async``: gradients the server applied) over the training time
  of rank 0 (from ``on_train_start`` to ``on_train_end``; for ``async`` the server's).
- time-to-accuracy: rank 0 keeps the parameters every ``--snapshot-every`` updates with the time
  they were reached (``mpi``: after the step; ``async``: the server's, when it logs); after the run
  every snapshot is scored on the whole validation set, and the time-to-accuracy is the first
  time the validation metric reaches the target: ``--target-fraction`` of the best value the
  undisturbed ``mpi`` run reached in the same repetition (or ``--target`` itself). Null: never.
``mpi`` moves at the pace of its slowest rank; ``async`` applies each worker's gradient as it
arrives, within the staleness bound, so a slow worker only contributes fewer of them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the repository first: benchmarks/strategies.py must not shadow the strategies package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import common  # noqa: E402


def parse_args(argv=None):
    p = common.parser(__doc__.splitlines()[0], nprocs=3, repeats=3)
    p.add_argument("--model", default="gcn", help="on its own default dataset")
    p.add_argument("--factors", type=float, nargs="+", help="slow-down factors (default 1.5 2 3, quick 3)")
    p.add_argument("--max-epochs", type=int, help="epochs per run (default: the model's own, quick 4)")
    p.add_argument("--staleness", type=int, default=4, help="the async strategy's staleness bound")
    p.add_argument("--snapshot-every", type=int, help="updates between snapshots (default 10, quick 2)")
    p.add_argument("--metric", default="val/acc", help="validation metric of the target (higher is better)")
    p.add_argument("--target", type=float, help="absolute target of --metric (default: see --target-fraction)")
    p.add_argument(
        "--target-fraction",
        type=float,
        default=0.95,
        help="target = this fraction of the best --metric of the undisturbed mpi run",
    )
    p.add_argument("--batch-size", type=int, help="per-process batch size; default: the dataset's own, quick 16")
    args = common.parse(p, argv)
    args.factors = args.factors or ([3.0] if args.quick else [1.5, 2.0, 3.0])
    args.snapshot_every = args.snapshot_every or (2 if args.quick else 10)
    args.batch_size = args.batch_size or (16 if args.quick else None)
    if args.nprocs < 3:
        p.error("--nprocs must be at least 3: the async strategy needs a server and two workers")
    if min(args.factors) < 1:
        p.error("--factors must be at least 1 (1: not slowed)")
    return args


class Snapshots:
    """Rank 0's parameters at moments of training, with the seconds since training started."""

    def __init__(self, module):
        self.module, self.taken = module, []
        self.started = time.perf_counter()

    def take(self, updates: int) -> None:
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.taken.append((time.perf_counter() - self.started, updates, state))


def mpi_snapshots(every: int):
    """A callback taking a snapshot after every ``every``-th step on rank 0."""
    from lightning.pytorch import Callback

    class AfterSteps(Callback):
        snapshots = None

        def on_train_start(self, trainer, pl_module) -> None:
            self.snapshots = Snapshots(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_rank == 0 and trainer.global_step % every == 0:
                self.snapshots.take(trainer.global_step)

    return AfterSteps()


def server_snapshots():
    """A logger taking a snapshot whenever the async server logs its progress (every
    ``log_every_n_steps`` updates): no callback runs on the server while it serves."""
    from lightning.pytorch.loggers.logger import Logger

    class WhenServerLogs(Logger):
        snapshots = None
        name, version = "snapshots", 0

        def start(self, module) -> None:
            self.snapshots = Snapshots(module)

        def log_metrics(self, metrics, step=None) -> None:
            if "async/updates_per_s" in metrics and self.snapshots is not None:
                self.snapshots.take(int(step))

        def log_hyperparams(self, *args, **kwargs) -> None:
            pass

    return WhenServerLogs()


def train(workload, name: str, delay: float, args) -> dict:
    """One run of ``name`` with the last rank slowed by ``delay`` seconds per step."""
    from lightning.pytorch import Callback

    from benchmarks import harness
    from benchmarks import step_timer as st
    from lightning_xd.callbacks import StragglerDelay
    from lightning_xd.comm.communicator import world

    comm = world()
    timer = st.StepTimer(warmup=0)
    callbacks = [StragglerDelay(comm.size - 1, delay), timer] if delay > 0 else [timer]
    datamodule, model, strategy = workload.build(name, **({"staleness": args.staleness} if name == "async" else {}))
    options = {"max_epochs": args.max_epochs or workload_epochs(workload, args.quick)}
    if name == "async":
        logger = server_snapshots()
        options.update(logger=logger, log_every_n_steps=args.snapshot_every)

        class StartClock(Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                logger.start(pl_module)

        callbacks.append(StartClock())
    else:
        callbacks.append(mpi_snapshots(args.snapshot_every))
    trainer = harness.trainer(strategy, callbacks=callbacks, **options)
    with common.torch_distributed_left_as_found():
        trainer.fit(model, datamodule=datamodule)
    updates = trainer.strategy.summary_metrics().get("global_step", trainer.global_step)  # async: the server's count
    per_rank = timer.gather()
    snapshots = (logger.snapshots if name == "async" else callbacks[-1].snapshots).taken if comm.rank == 0 else []
    return {
        "updates": updates,
        "train_s": timer.train_seconds,
        "updates_per_s": updates / timer.train_seconds,
        "step_s": st.step_seconds(per_rank),
        "samples_per_s": st.samples_per_s(per_rank),
        "staleness_mean": trainer.strategy.summary_metrics().get("async/staleness_mean"),
        "snapshots": snapshots,
    }


def workload_epochs(workload, quick: bool) -> int:
    from lightning_xd.launch.registry import MODELS

    return 4 if quick else MODELS.get(workload.model).defaults.get("max_epochs", 10)


def score(workload, snapshots: list, metric: str) -> list[dict]:
    """The validation metric of every snapshot (rank 0's), on the whole validation set over all ranks."""
    from benchmarks import harness
    from lightning_xd.comm.communicator import world

    comm = world()
    datamodule, model, _ = workload.build("mpi")
    curve = []
    for i in range(comm.broadcast_object(len(snapshots))):
        seconds, updates, state = snapshots[i] if comm.rank == 0 else (None, None, None)
        if comm.rank == 0:
            model.load_state_dict(state)
        strategy = workload.build("mpi")[2]  # its setup gives every rank rank 0's parameters
        validated = harness.trainer(strategy, limit_val_batches=1.0).validate(model, datamodule, verbose=False)
        curve.append({"seconds": seconds, "updates": updates, "value": float(validated[0][metric])})
    return comm.broadcast_object(curve)


def time_to(curve: list[dict], target: float):
    return next((point["seconds"] for point in curve if point["value"] >= target), None)


def repetition(workload, args, index: int) -> dict:
    from lightning_xd.comm.communicator import world

    baseline = train(workload, "mpi", 0.0, args)
    baseline["curve"] = score(workload, baseline.pop("snapshots"), args.metric)
    target = (
        args.target if args.target is not None else args.target_fraction * max(p["value"] for p in baseline["curve"])
    )
    rows = []
    for factor in args.factors:
        delay = (factor - 1) * baseline["step_s"]
        row = {"factor": factor, "delay_s": delay}
        for name in ["mpi", "async"] if index % 2 == 0 else ["async", "mpi"]:
            result = train(workload, name, delay, args)
            result["curve"] = score(workload, result.pop("snapshots"), args.metric)
            result["time_to_target_s"] = time_to(result["curve"], target)
            row[name] = result
        row["async_over_mpi_updates_per_s"] = row["async"]["updates_per_s"] / row["mpi"]["updates_per_s"]
        rows.append(row)
        if world().rank == 0:
            print(
                f"slowed x{factor}: updates/s mpi {row['mpi']['updates_per_s']:.1f}, async "
                f"{row['async']['updates_per_s']:.1f}; time to {args.metric} >= {target:.3f}: mpi "
                f"{row['mpi']['time_to_target_s']}, async {row['async']['time_to_target_s']}",
                flush=True,
            )
    return {"undisturbed": baseline, "target": target, "rows": rows}


def summarize(repetitions: list[dict], args) -> dict:
    def over(factor_index: int, name: str, key: str) -> list:
        return [r["rows"][factor_index][name][key] for r in repetitions]

    rows = []
    for i, factor in enumerate(args.factors):
        row = {
            "factor": factor,
            "async_over_mpi_updates_per_s": common.ratio_stats(
                over(i, "async", "updates_per_s"), over(i, "mpi", "updates_per_s")
            ),
        }
        for name in ("mpi", "async"):
            reached = [t for t in over(i, name, "time_to_target_s") if t is not None]
            row[name] = {
                "updates_per_s": common.stats(over(i, name, "updates_per_s")),
                "samples_per_s": common.stats(over(i, name, "samples_per_s")),
                "time_to_target_s": common.stats(reached) if reached else None,
                "reached_target": f"{len(reached)}/{len(repetitions)}",
            }
        row["async"]["staleness_mean"] = common.stats(over(i, "async", "staleness_mean"))
        rows.append(row)
    return {
        "undisturbed_step_s": common.stats(r["undisturbed"]["step_s"] for r in repetitions),
        "target": common.stats(r["target"] for r in repetitions),
        "rows": rows,
    }


def run(args) -> None:
    from benchmarks import harness
    from lightning_xd.comm.communicator import world

    harness.quiet()
    comm = world()
    common.check_world(comm, args.nprocs, "straggler")
    harness.share_cores()
    workload = harness.Workload.of(
        args.model, {"data_dir": args.data_dir, "cache_dir": args.cache_dir, "batch_size": args.batch_size}
    )
    workload.prepare()
    repetitions = [repetition(workload, args, i) for i in range(args.repeats)]
    if comm.rank == 0:
        summary = summarize(repetitions, args)
        by_factor = {row["factor"]: row["async_over_mpi_updates_per_s"]["median"] for row in summary["rows"]}
        result = {
            "machine": common.machine(),
            "model": args.model,
            "data": workload.data,
            "nprocs": args.nprocs,
            "slowed_rank": comm.size - 1,
            "staleness": args.staleness,
            "metric": args.metric,
            "max_epochs": args.max_epochs or workload_epochs(workload, args.quick),
            "repeats": args.repeats,
            "quick": args.quick,
            **summary,
            "repetitions": repetitions,
            "async_over_mpi_updates_per_s_straggler3x": by_factor.get(3.0),
        }
        path = common.write_results(args.results_dir, common.result_name("straggler", args.quick), result)
        plot(result, path.with_suffix(".png"))
        print(f"wrote {path}", flush=True)


def plot(result: dict, path: Path) -> Path:
    from benchmarks import plots

    factors = [row["factor"] for row in result["rows"]]
    image = plots.canvas(3, 1)
    plots.range_lines(
        image,
        plots.panel(0, 0),
        {name: (factors, [row[name]["updates_per_s"] for row in result["rows"]]) for name in ("mpi", "async")},
        "updates/s, one worker slowed",
        "slow-down factor",
        "updates/s",
    )
    reached = {
        name: (
            factors,
            [
                row[name]["time_to_target_s"] or {"median": float("nan"), "min": float("nan"), "max": float("nan")}
                for row in result["rows"]
            ],
        )
        for name in ("mpi", "async")
    }
    plots.range_lines(
        image, plots.panel(1, 0), reached, f"time to {result['metric']} >= target", "slow-down factor", "s"
    )
    last = result["repetitions"][-1]
    worst = last["rows"][-1]
    curves = {
        f"{name} x{worst['factor']}": (
            [p["seconds"] for p in worst[name]["curve"]],
            [p["value"] for p in worst[name]["curve"]],
        )
        for name in ("mpi", "async")
    }
    curves["mpi undisturbed"] = (
        [p["seconds"] for p in last["undisturbed"]["curve"]],
        [p["value"] for p in last["undisturbed"]["curve"]],
    )
    plots.range_lines(
        image,
        plots.panel(2, 0),
        {},
        f"{result['metric']} during training (last repetition)",
        "seconds",
        result["metric"],
        curves,
    )
    return plots.save(
        image,
        path,
        f"{result['model']} on {result['data']}, {result['nprocs']} processes, rank "
        f"{result['slowed_rank']} slowed; {common.machine_line(result['machine'])}",
    )


if __name__ == "__main__":
    common.main(run, parse_args, __file__)
