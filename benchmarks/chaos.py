"""Chaos: kill random ranks (or whole emulated hosts) at random steps of the ECG autoencoder and
measure recovery, for ULFM in-job recovery and for supervisor restarts side by side.

    python benchmarks/chaos.py [--trials 20] [--modes ulfm supervisor [hosts]] [--nprocs 3]
                               [--seed 0] [--data-dir DIR] [--quick]

One undisturbed run comes first: its AUC-ROC and wall time are the reference, and its number of
optimizer steps is the span the kills are drawn from (a step uniformly in it, a rank uniformly
among all, rank 0 included: in-job recovery survives the loss of rank 0 too). Each trial is one
``train.py`` job with one fault:

- ``ulfm``: ``--inject-fault kill:rank=R,step=S`` under ``--fault-tolerance ulfm``, no restarts
  allowed: the survivors must shrink, redo the step and finish on N-1 processes;
- ``supervisor``: the same kill under ``--fault-tolerance none --max-restarts 2``: the job ends
  and the supervisor relaunches it on N processes from the newest verified checkpoint;
- ``hosts``: N emulated hosts (network namespaces, root only) of one process each, one killed
  whole (processes and daemon) at step S; the supervisor relaunches on the N-1 that still answer.

Reported per mode: recoveries, success rate, time to recover, steps redone, final test AUC-ROC,
wall time per trial and checkpoint overhead (see ``chaos_measure`` for the definitions), in
``benchmarks/results/chaos[-quick].json`` and a table. ``--quick`` is one trial per mode on tiny
generated ECG data: it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # the repository first: benchmarks/strategies.py must not shadow the strategies package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import common  # noqa: E402
from benchmarks.chaos_jobs import Job, run_train  # noqa: E402
from benchmarks.chaos_measure import Trial, outcome, summarize  # noqa: E402

MODES = ("ulfm", "supervisor", "hosts")
CHECKPOINT_BUDGET_PCT = 5.0  # issue 8: checkpoints may cost at most this share of step time
TARGET_AUROC = 0.97  # issue 8: the ECG example's test AUC-ROC after recovery
# what --trials, --ckpt-every-steps and --trial-timeout default to, in a full run and with --quick
DEFAULTS = {"trials": 20, "ckpt_every_steps": 40, "trial_timeout": 900.0}
QUICK = {"trials": 1, "ckpt_every_steps": 2, "trial_timeout": 300.0}
QUICK_FLAGS = ["--max-epochs", "3", "--batch-size", "2"]  # tiny data: a dozen steps
# the supervisor path; a spare restart in case a relaunched attempt hangs and its watchdog ends it
RESTARTS = ["--fault-tolerance", "none", "--max-restarts", "2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--trials", type=int, help="trials per mode (default 20; --quick: 1)")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["ulfm", "supervisor"],
        choices=MODES,
        help="recovery paths to try (default: ulfm supervisor)",
    )
    p.add_argument(
        "--nprocs", type=int, default=3, help="processes of every job, emulated hosts of --modes hosts (default 3)"
    )
    p.add_argument("--seed", type=int, default=0, help="draws the ranks, hosts and steps killed (default 0)")
    p.add_argument(
        "--ckpt-every-steps",
        type=int,
        help="checkpoint interval of every job, which the supervisor resumes from (default 40: "
        "within the 5%% overhead budget on the ECG example; --quick: 2)",
    )
    p.add_argument(
        "--collective-timeout",
        type=float,
        default=60.0,
        help="train.py's watchdog: a collective that waits longer ends the job (default 60 s)",
    )
    p.add_argument("--trial-timeout", type=float, help="seconds one job may take in all (default 900; --quick: 300)")
    p.add_argument(
        "--data-dir",
        help="datasets, laid out as ../shared/data; default: train.py's ($XD_DATA_DIR, "
        "else ./data), or with --quick tiny generated ECG data",
    )
    p.add_argument("--cache-dir", help="preprocessed data; default: train.py's ($XD_CACHE_DIR ...)")
    p.add_argument(
        "--work-dir", help="where runs and logs go (kept); default: a temporary dir, removed unless a trial failed"
    )
    p.add_argument(
        "--results-dir", default=str(common.RESULTS), help="where chaos[-quick].json goes (default benchmarks/results)"
    )
    p.add_argument("--quick", action="store_true", help="1 trial per mode on tiny generated data")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check(args: argparse.Namespace) -> None:
    """Refuse impossible options before anything starts (one line, as BenchmarkError)."""
    if args.trials < 1:
        raise common.BenchmarkError(f"--trials must be at least 1, got {args.trials}")
    if args.nprocs < 2:
        raise common.BenchmarkError(f"--nprocs must be at least 2 (every trial loses a process), got {args.nprocs}")
    if "hosts" in args.modes:
        from benchmarks.chaos_hosts import unavailable

        why = unavailable()
        if why:
            raise common.BenchmarkError(f"--modes hosts needs emulated hosts: {why}")


def generated_data(folder: Path) -> Path:
    """Tiny ECG5000-format data written by the tests' generator (imported by path)."""
    spec = importlib.util.spec_from_file_location("ecg_generator", common.REPO / "tests" / "generators" / "ecg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_ecg5000(folder)
    return folder


def job_flags(args: argparse.Namespace, data_dir: Path | None) -> list[str]:
    """The ECG example's command, with the checkpoint interval and watchdog of the benchmark."""
    flags = [
        "--model",
        "autoencoder",
        "--data",
        "ecg",
        "--strategy",
        "mpi",
        "--nprocs",
        str(args.nprocs),
        "--ckpt-every-steps",
        str(args.ckpt_every_steps),
        "--collective-timeout",
        str(args.collective_timeout),
    ]
    if data_dir is not None:
        flags += ["--data-dir", str(data_dir)]
    if args.cache_dir:
        flags += ["--cache-dir", args.cache_dir]
    return flags + (QUICK_FLAGS if args.quick else [])


def draw_trials(args: argparse.Namespace, total_steps: int) -> list[Trial]:
    """Every trial's target and step, drawn up front from ``--seed`` (so a run can be repeated)."""
    rng = random.Random(args.seed)
    return [
        Trial(mode, i, rng.randrange(args.nprocs), rng.randrange(total_steps))
        for mode in args.modes
        for i in range(args.trials)
    ]


def run_trial(trial: Trial, flags: list[str], work: Path, args: argparse.Namespace) -> Job:
    """One job with the trial's fault: a rank killed by the fault injector, or a host by the benchmark."""
    run_dir = work / f"{trial.mode}-{trial.index:02d}"
    fault = ["--inject-fault", f"kill:rank={trial.target},step={trial.step}"]
    if trial.mode == "ulfm":
        return run_train([*flags, "--fault-tolerance", "ulfm", *fault], run_dir, args.trial_timeout)
    if trial.mode == "supervisor":
        return run_train([*flags, *RESTARTS, *fault], run_dir, args.trial_timeout)
    from benchmarks.chaos_hosts import HostKiller, emulated_hosts, host_flags

    with emulated_hosts(args.nprocs, run_dir.parent / f"{run_dir.name}-hosts") as hosts:
        argv = [*flags, *host_flags(hosts, args.nprocs), *RESTARTS]
        return run_train(
            argv,
            run_dir,
            args.trial_timeout,
            env=hosts.mpi_environment(),
            watch=HostKiller(hosts, trial.target, trial.step),
        )


def baseline_record(job: Job) -> dict:
    metrics = job.metrics()
    return {
        "test_auroc": metrics.get("test/auroc"),
        "wall_time_s": job.wall_time_s,
        "global_step": metrics.get("global_step"),
        "world_size": metrics.get("world_size"),
        "step_time_s_mean": metrics.get("step_time_s_mean"),
        "train_time_s": metrics.get("train_time_s"),
        "checkpoint_saves": metrics.get("checkpoint/saves"),
        "checkpoint_overhead_pct": metrics.get("checkpoint/overhead_pct"),
    }


def trial_line(record: dict, trials: int) -> str:
    target = f"{'host' if 'host' in record else 'rank'} {record.get('host', record.get('rank'))}"
    head = f"{record['mode']} {record['trial'] + 1}/{trials}: killed {target} at step {record['step']}"
    if not record["recovered"]:
        return f"{head}: NOT recovered ({record['problem']}); log {record['log']}"
    ttr = record.get("time_to_recover_s")
    return (
        f"{head}: recovered in {ttr:.2f} s" if ttr is not None else f"{head}: recovered"
    ) + f", {record['steps_redone']} step(s) redone, test AUC {record['test_auroc']:.3f}, {record['wall_time_s']:.0f} s"


def _spread(stat: dict | None, digits: int = 2) -> str:
    if not stat:
        return "-"
    return " / ".join(f"{stat[k]:.{digits}f}" for k in ("mean", "median", "min", "max"))


def table(baseline: dict, summaries: dict[str, dict]) -> str:
    """The results as a Markdown table (ready for the example's README)."""
    rows = [
        "| mode | recovered | time to recover, s (mean / median / min / max) | steps redone (mean / max) "
        "| test AUC-ROC (mean / min) | wall s per trial | checkpoint overhead % |",
        "|---|---|---|---|---|---|---|",
        f"| undisturbed | - | - | - | {baseline['test_auroc']:.4f} | {baseline['wall_time_s']:.1f} "
        f"| {baseline['checkpoint_overhead_pct']:.1f} |",
    ]
    for mode, s in summaries.items():
        redone = f"{s['steps_redone']['mean']:.1f} / {s['steps_redone']['max']:.0f}" if s["steps_redone"] else "-"
        auroc = f"{s['test_auroc']['mean']:.4f} / {s['test_auroc']['min']:.4f}" if s["test_auroc"] else "-"
        wall = f"{s['wall_time_s']['mean']:.1f}" if s["wall_time_s"] else "-"
        overhead = f"{s['checkpoint_overhead_pct']['mean']:.1f}" if s["checkpoint_overhead_pct"] else "-"
        rows.append(
            f"| {mode} | {s['recovered']}/{s['trials']} | {_spread(s['time_to_recover_s'])} | {redone} "
            f"| {auroc} | {wall} | {overhead} |"
        )
    return "\n".join(rows)


NOTES = [
    "time to recover: from the kill to training going on (ULFM: detection + shrink; supervisor: "
    "noticing the loss, relaunch, start-up of every process, checkpoint load); a rank's kill is timed "
    "by the fault injector's own clock just before it SIGKILLs its process (one machine: one clock), "
    "a host's kill by the benchmark, which kills it",
    "steps redone: completed steps lost and trained again; both paths also redo the interrupted step",
    "the killed rank is drawn among all, rank 0 included: ULFM survives losing rank 0 (the survivors' "
    "new rank 0 writes the metrics); the supervisor relaunches on all N processes (N-1 after a lost host)",
    "the undisturbed run is the ECG example with the same flags (and ULFM enabled, as by default)",
]


def verdict(baseline: dict, summaries: dict[str, dict]) -> dict:
    """Issue 8's criteria: every trial recovered, AUC-ROC after recovery, checkpoint overhead."""
    lowest = [s["test_auroc"]["min"] for s in summaries.values() if s["test_auroc"]]
    return {
        "all_recovered": all(s["recovered"] == s["trials"] for s in summaries.values()),
        "lowest_auroc_after_recovery": min(lowest) if lowest else None,
        "auroc_target": TARGET_AUROC,
        "auroc_reached": bool(lowest) and min(lowest) >= TARGET_AUROC,
        "checkpoint_budget_pct": CHECKPOINT_BUDGET_PCT,
        "checkpoint_overhead_pct": baseline["checkpoint_overhead_pct"],
        "checkpoint_overhead_within_budget": baseline["checkpoint_overhead_pct"] <= CHECKPOINT_BUDGET_PCT,
    }


def verdict_line(v: dict, quick: bool) -> str:
    lowest = v["lowest_auroc_after_recovery"]
    parts = [
        f"every trial recovered: {'yes' if v['all_recovered'] else 'NO'}",
        f"lowest test AUC-ROC after recovery {'-' if lowest is None else f'{lowest:.4f}'} (target "
        f"{v['auroc_target']}: {'reached' if v['auroc_reached'] else 'NOT reached'})",
        f"checkpoint overhead of the undisturbed run {v['checkpoint_overhead_pct']:.1f}% of step time (budget "
        f"{v['checkpoint_budget_pct']:.0f}%: {'within' if v['checkpoint_overhead_within_budget'] else 'OVER'})",
    ]
    prefix = "quick run (tiny data, a checkpoint every 2 steps: the criteria do not apply): " if quick else ""
    return prefix + "; ".join(parts)


def run_trials(args: argparse.Namespace, flags: list[str], work: Path, total_steps: int) -> dict[str, list[dict]]:
    """Every mode's trials, one after another, each reported as it ends."""
    records: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for trial in draw_trials(args, total_steps):
        record = outcome(run_trial(trial, flags, work, args), trial, total_steps, args.nprocs)
        records[trial.mode].append(record)
        print(trial_line(record, args.trials), flush=True)
    return records


def benchmark(args: argparse.Namespace, work: Path) -> bool:
    """Baseline, trials, results; True when every trial recovered."""
    data_dir = Path(args.data_dir) if args.data_dir else (generated_data(work / "data") if args.quick else None)
    flags = job_flags(args, data_dir)
    base_job = run_train(flags, work / "baseline", args.trial_timeout)
    if not base_job.completed:
        print(
            f"error: the undisturbed run did not finish (exit code {base_job.returncode}); see {base_job.log}",
            file=sys.stderr,
        )
        return False
    baseline = baseline_record(base_job)
    print(
        f"undisturbed: {baseline['global_step']} steps, test AUC {baseline['test_auroc']:.4f}, "
        f"{baseline['wall_time_s']:.1f} s, checkpoint overhead {baseline['checkpoint_overhead_pct']:.1f}% "
        f"of step time",
        flush=True,
    )
    records = run_trials(args, flags, work, baseline["global_step"])
    summaries = {mode: summarize(rs) for mode, rs in records.items()}
    judged = verdict(baseline, summaries)
    content = {
        "machine": common.machine(),
        "quick": args.quick,
        "seed": args.seed,
        "nprocs": args.nprocs,
        "trials_per_mode": args.trials,
        "ckpt_every_steps": args.ckpt_every_steps,
        "collective_timeout_s": args.collective_timeout,
        "data_dir": str(data_dir or os.environ.get("XD_DATA_DIR", "./data")),
        "train_flags": flags,
        "baseline": baseline,
        "verdict": judged,
        "notes": NOTES,
        "modes": {mode: {"summary": summaries[mode], "trials": records[mode]} for mode in args.modes},
    }
    print("\n" + table(baseline, summaries) + "\n")
    print(*(f"- {note}" for note in NOTES), sep="\n")
    print(verdict_line(judged, args.quick))
    print(f"wrote {common.write_results(args.results_dir, common.result_name('chaos', args.quick), content)}")
    return judged["all_recovered"]


def _exit_on_sigterm(signum, frame) -> None:
    """A terminated benchmark still ends its job and removes its namespaces (the ``finally`` blocks)."""
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check(args)
    except common.BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="xd-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    ok = benchmark(args, work.resolve())
    if ok and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"runs and logs kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
