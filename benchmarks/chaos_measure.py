"""What one chaos trial measured, and the summary of a mode's trials.

Both recovery paths are measured the same way, so they can stand side by side:

- *time to recover*: from the kill (the fault injector's announcement, or the moment an emulated
  host was killed) until training goes on: ULFM's recovery event (after detection and shrinking),
  or the first step of the supervisor's next attempt;
- *steps redone*: completed optimizer steps whose work was lost and trained again. ULFM loses
  none (recorded step of the recovery against the step of the kill); the supervisor redoes those
  since its newest verified checkpoint. Both also redo the step that was interrupted.

A trial *recovered* when the job finished (``COMPLETED``), the fault did happen, recovery is on
record, the world has the size it should have after the loss, training reached the undisturbed
run's last step or beyond, and the test AUC-ROC is a number in [0, 1].
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from benchmarks import common
from benchmarks.chaos_jobs import Job


@dataclass(frozen=True)
class Trial:
    mode: str  # ulfm | supervisor | hosts
    index: int
    target: int  # the rank (ulfm, supervisor) or emulated host (hosts) killed
    step: int  # the global step at which it is killed

    @property
    def target_kind(self) -> str:
        return "host" if self.mode == "hosts" else "rank"


def _finished_problem(job: Job, metrics: dict, baseline_steps: int) -> str | None:
    """Why the job does not count as a finished, sane run (None if it does)."""
    if job.timed_out:
        return "timed out"
    if not job.completed:
        return f"no COMPLETED marker (exit code {job.returncode})"
    auroc = metrics.get("test/auroc")
    if not isinstance(auroc, (int, float)) or not math.isfinite(auroc) or not 0 <= auroc <= 1:
        return f"test/auroc is {auroc!r}"
    if metrics.get("global_step", 0) < baseline_steps:
        return f"stopped at step {metrics.get('global_step')}, before the undisturbed run's {baseline_steps}"
    return None


def _ulfm(job: Job, trial: Trial, metrics: dict, nprocs: int) -> tuple[dict, str | None]:
    events = metrics.get("fault/recovery_events") or []
    if not events:
        return {}, "no in-job recovery on record"
    event = events[0]
    measured = {
        "lost_ranks": event.get("lost_ranks"),
        "shrink_s": event.get("seconds"),
        "steps_redone": max(0, trial.step - event.get("global_step", trial.step)),
        "recoveries": len(events),
    }
    if job.fault_at is not None:
        measured["time_to_recover_s"] = event["time"] - job.fault_at
        measured["detection_s"] = measured["time_to_recover_s"] - event["seconds"]
    if metrics.get("world_size") != nprocs - 1:
        return measured, f"world size {metrics.get('world_size')} after recovery, expected {nprocs - 1}"
    return measured, None


def _restart(job: Job, metrics: dict, killed_at: float | None, world_after: int) -> tuple[dict, str | None]:
    restarts = metrics.get("supervisor/restarts", 0)
    if not restarts:
        return {}, "no supervisor restart on record"
    attempts = metrics.get("supervisor/attempts", [])
    measured = {
        "restarts": restarts,
        "downtime_s": sum(metrics.get("supervisor/downtime_s", [])),
        "steps_redone": sum(metrics.get("supervisor/steps_redone", [])),
    }
    resumed_at = attempts[1].get("training_started_at") if len(attempts) > 1 else None
    if killed_at is not None and resumed_at is not None:
        measured["time_to_recover_s"] = resumed_at - killed_at
    if metrics.get("world_size") != world_after:
        return measured, f"world size {metrics.get('world_size')} after the restart, expected {world_after}"
    return measured, None


def outcome(job: Job, trial: Trial, baseline_steps: int, nprocs: int) -> dict:
    """The trial's record: what was killed, whether it recovered (and if not, why), what it cost."""
    metrics = job.metrics()
    killed_at = job.extra.get("killed_at", job.fault_at)
    record = {
        "mode": trial.mode,
        "trial": trial.index,
        trial.target_kind: trial.target,
        "step": trial.step,
        "killed_at_step": job.extra.get("killed_step", trial.step if killed_at else None),
        "test_auroc": metrics.get("test/auroc"),
        "world_size": metrics.get("world_size"),
        "global_step": metrics.get("global_step"),
        "wall_time_s": job.wall_time_s,
        "checkpoint_overhead_pct": metrics.get("checkpoint/overhead_pct"),
        "returncode": job.returncode,
    }
    problem = _finished_problem(job, metrics, baseline_steps)
    if killed_at is None:
        problem = problem or "the fault never happened (no kill on record)"
    elif trial.mode == "ulfm":
        measured, recovery_problem = _ulfm(job, trial, metrics, nprocs)
        record.update(measured)
        problem = problem or recovery_problem
    else:
        world_after = nprocs - 1 if trial.mode == "hosts" else nprocs  # a lost host is not started again
        measured, recovery_problem = _restart(job, metrics, killed_at, world_after)
        record.update(measured)
        problem = problem or recovery_problem
    record.update(recovered=problem is None, problem=problem)
    if problem is not None:
        record.update(run_dir=str(job.run_dir), log=str(job.log), log_tail=job.log_tail())
    return record


def stats(values: list) -> dict | None:
    """Mean, median, min and max of the values that were measured (None when none was): the mean
    too, since mean time to recover is what the issue asks for."""
    values = [v for v in values if isinstance(v, (int, float))]
    return {**common.stats(values), "mean": statistics.fmean(values)} if values else None


def summarize(records: list[dict]) -> dict:
    """A mode's trials in a few numbers; costs are over the trials that recovered."""
    good = [r for r in records if r["recovered"]]
    summary = {
        "trials": len(records),
        "recovered": len(good),
        "success_rate": len(good) / len(records) if records else None,
    }
    for key in (
        "time_to_recover_s",
        "detection_s",
        "shrink_s",
        "downtime_s",
        "steps_redone",
        "test_auroc",
        "wall_time_s",
        "checkpoint_overhead_pct",
    ):
        summary[key] = stats([r.get(key) for r in good])
    return summary
