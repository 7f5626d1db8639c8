"""Checkpoint cost per model: the time to write one, the stall training sees, and the overhead as a
percentage of the time spent in training steps.

    python benchmarks/checkpoint.py [--models cnn gcn] [--nprocs 2] [--every-steps 10] [--quick]

Each model trains on its own dataset with the ``mpi`` strategy on N processes (train.py's
``--strategy mpi --nprocs N``) and checkpoints every K steps through train.py's own checkpoint
callback and IO (model, optimizer, loops, data position and every process's random state;
temporary file, fsync, rename, sha256 manifest; keep the last 3). Two runs per repetition:
- write: checkpoints written in the training thread (``--background-checkpoints false``): the
  stall is the whole write.
- stall: checkpoints written from a snapshot by a background thread (train.py's default): the
  stall is taking the snapshot.
A stall is timed by the checkpoint callback itself (``FaultTolerantCheckpoint.save_seconds``,
what train.py's ``checkpoint/overhead_pct`` adds up); the step time is the median training step of
the same runs, checkpoints excluded. overhead_pct = 100 x (stalls) / (time in training steps) in
the background run, as ``checkpoint/overhead_pct``: the share of training time that
checkpointing every K steps costs. A background write's competition for the cores with the
next steps is not in it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # the repository first: benchmarks/strategies.py must not shadow the strategies package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import common  # noqa: E402


def parse_args(argv=None):
    p = common.parser(__doc__.splitlines()[0], nprocs=2, repeats=3)
    p.add_argument("--models", nargs="+", default=["cnn", "gcn"], help="each on its own default dataset")
    p.add_argument("--every-steps", type=int, help="checkpoint every K steps (default 10, quick 2)")
    p.add_argument("--checkpoints", type=int, help="checkpoints per run (default 5, quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3, quick 1)")
    p.add_argument("--batch-size", type=int, help="per-process batch size; default: each dataset's own, quick 16")
    p.add_argument("--checkpoint-dir", help="where checkpoints are written (default: a temporary folder, removed)")
    args = common.parse(p, argv)
    args.every_steps = args.every_steps or (2 if args.quick else 10)
    args.checkpoints = args.checkpoints or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.batch_size = args.batch_size or (16 if args.quick else None)
    if args.every_steps < 1 or args.checkpoints < 1:
        p.error("--every-steps and --checkpoints must be at least 1")
    return args


def measure(workload, background: bool, folder: Path, args) -> dict:
    """One run: every stall during training (the final checkpoint at train end excluded) and the steps."""
    from benchmarks import harness
    from benchmarks import step_timer as st
    from lightning_xd.callbacks import FaultTolerantCheckpoint
    from lightning_xd.fault_tolerance.checkpoints import BackgroundCheckpointIO, CheckpointStore, VerifiedCheckpointIO

    steps = args.warmup + args.every_steps * args.checkpoints
    checkpoints = FaultTolerantCheckpoint(folder, every_n_steps=args.every_steps, min_seconds=float("inf"))
    timer = st.StepTimer(args.warmup, align=True)
    io = BackgroundCheckpointIO(VerifiedCheckpointIO()) if background else VerifiedCheckpointIO()
    harness.fit(workload, "mpi", steps, [timer, checkpoints], plugins=[io], default_root_dir=str(folder))
    stalls = checkpoints.save_seconds[: steps // args.every_steps]
    per_rank = timer.gather()
    newest = CheckpointStore(folder).manifests()
    return {
        "stalls_s": stalls,
        "step_s": st.step_seconds(per_rank),
        "steps_s_total": max(sum(s.seconds for s in rank_steps) for rank_steps in per_rank),
        "bytes": newest[0]["bytes"] if newest else None,
    }


def compare(workload, folder: Path, args) -> dict:
    from lightning_xd.comm.communicator import world

    workload.prepare()
    runs: dict[str, list[dict]] = {"write": [], "stall": []}
    for repetition in range(args.repeats):
        kinds = ["write", "stall"] if repetition % 2 == 0 else ["stall", "write"]
        for kind in kinds:
            run_folder = folder / f"{workload.model}-{kind}-{repetition}"
            runs[kind].append(measure(workload, kind == "stall", run_folder, args))
            if world().rank == 0:
                r = runs[kind][-1]
                print(
                    f"{workload.model} {kind:5}: checkpoint stall {1e3 * max(r['stalls_s']):8.2f} ms (max), "
                    f"step {1e3 * r['step_s']:7.2f} ms",
                    flush=True,
                )
    return summarize(runs, workload, args)


def summarize(runs: dict, workload, args) -> dict:
    import statistics

    def median_stall(r: dict) -> float:
        return statistics.median(r["stalls_s"])

    write, stall = runs["write"], runs["stall"]
    overhead = [100 * sum(r["stalls_s"]) / r["steps_s_total"] for r in stall]
    return {
        "data": workload.data,
        "every_steps": args.every_steps,
        "checkpoint_bytes": write[-1]["bytes"],
        "write_s": common.stats(median_stall(r) for r in write),
        "stall_s": common.stats(median_stall(r) for r in stall),
        "step_s": common.stats(r["step_s"] for r in write + stall),
        "write_pct_of_step": common.ratio_stats([100 * median_stall(r) for r in write], [r["step_s"] for r in write]),
        "stall_pct_of_step": common.ratio_stats([100 * median_stall(r) for r in stall], [r["step_s"] for r in stall]),
        "overhead_pct": common.stats(overhead),
        "repetitions": runs,
    }


def run(args) -> None:
    import shutil
    import tempfile

    from benchmarks import harness
    from lightning_xd.comm.communicator import world

    harness.quiet()
    comm = world()
    common.check_world(comm, args.nprocs, "checkpoint")
    harness.share_cores()
    settings = {"data_dir": args.data_dir, "cache_dir": args.cache_dir, "batch_size": args.batch_size}
    folder = Path(comm.broadcast_object(args.checkpoint_dir or tempfile.mkdtemp(prefix="xd-bench-ckpt-")))
    try:
        models = {m: compare(harness.Workload.of(m, settings), folder, args) for m in args.models}
    finally:
        comm.barrier()
        if comm.rank == 0 and not args.checkpoint_dir:
            shutil.rmtree(folder, ignore_errors=True)
    if comm.rank == 0:
        result = {
            "machine": common.machine(),
            "nprocs": args.nprocs,
            "strategy": "mpi",
            "repeats": args.repeats,
            "quick": args.quick,
            "models": models,
            "checkpoint_overhead_pct": {m: r["overhead_pct"]["median"] for m, r in models.items()},
        }
        path = common.write_results(args.results_dir, common.result_name("checkpoint", args.quick), result)
        plot(result, path.with_suffix(".png"))
        print(f"wrote {path}", flush=True)


def plot(result: dict, path: Path) -> Path:
    from benchmarks import plots

    models = list(result["models"])
    image = plots.canvas(3, 1)
    for column, (key, title, unit, scale) in enumerate(
        [
            ("write_s", "checkpoint write (in the training thread)", "ms", 1e3),
            ("stall_s", "training stall (background write)", "ms", 1e3),
            ("overhead_pct", "overhead, checkpoint every K steps", "% of step time", 1),
        ]
    ):
        values = [{k: v * scale if k != "n" else v for k, v in result["models"][m][key].items()} for m in models]
        labels = [f"{m} K={result['models'][m]['every_steps']}" if key == "overhead_pct" else m for m in models]
        plots.range_bars(image, plots.panel(column, 0), labels, values, title, unit)
    return plots.save(
        image, path, f"{result['strategy']}, {result['nprocs']} processes; {common.machine_line(result['machine'])}"
    )


if __name__ == "__main__":
    common.main(run, parse_args, __file__)
