"""What a pipeline-parallel run cost: its idle share (the bubble) against theory, parameters and memory
per process, and the last step's timeline on each, for metrics.json and the dashboard.

The bubble of P stages and M micro-batches is (P - 1) / (M + P - 1) of a step in theory; the measured
one is each process's idle fraction over the recorded steps (the first, with its warm-up, left out).
"""

from __future__ import annotations

import resource
from typing import Any

from lightning_xd.comm.communicator import Communicator
from lightning_xd.parallel.pipeline import StepTimes


def pipeline_summary(
    comm: Communicator, recorded: list[StepTimes], own_params: int, stage_count: int, microbatches: int, schedule: str
) -> dict[str, Any]:
    """Gathered from every process of the job (rank order: replica by replica, stage by stage)."""
    steps = recorded[1:] or recorded  # the first step includes warm-up
    last = recorded[-1] if recorded else StepTimes()
    per_rank = comm.allgather_object(
        {
            "bubble": sum(t.idle_fraction for t in steps) / max(1, len(steps)),
            "params": own_params,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "timeline": last.timeline,
            "step_s": last.total,
        }
    )
    total_params = sum(r["params"] for r in per_rank[:stage_count])
    p, m = stage_count, microbatches
    return {
        "pipeline/stages": p,
        "pipeline/microbatches": m,
        "pipeline/schedule": schedule,
        "pipeline/bubble_measured": sum(r["bubble"] for r in per_rank) / len(per_rank),
        "pipeline/bubble_theory": (p - 1) / (m + p - 1),
        "pipeline/bubble_per_rank": [r["bubble"] for r in per_rank],
        "pipeline/params_per_rank": [r["params"] for r in per_rank],
        "pipeline/params_total": total_params,
        "pipeline/param_fraction_max": max(r["params"] for r in per_rank) / max(1, total_params),
        "pipeline/peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in per_rank],
        "pipeline/timelines": {r: info["timeline"] for r, info in enumerate(per_rank)},
        "pipeline/last_step_s": {r: info["step_s"] for r, info in enumerate(per_rank)},
    }
