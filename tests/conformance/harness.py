"""Inside an MPI job: run many cases one after the other, each saving what every rank saw.

A case is ``CASE/STRATEGY`` (``boring_fit/mpi``); ``run(out, cases, names)`` calls ``cases[CASE](folder,
STRATEGY)`` for each and saves its dict to ``out/CASE/STRATEGY/rank<r>.pt``. A case that raises saves its
error (one line, as a user would read it), the exception's type and its traceback instead, and the job goes
on with the next case, so one broken case hides no other. A ``started-rank<r>`` file marks a case begun,
so a case that hangs the job can be named.
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from reference_training import QUIET, state_of  # noqa: F401  (QUIET: for the cases, with the references' own)


def fit_summary(trainer: Trainer, model: torch.nn.Module, record: Any = None) -> dict[str, Any]:
    """What a fit ended with: parameters, counters, learning rates, logged metrics (and what ``record`` saw)."""
    summary = {
        "state": state_of(model),
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "lrs": [g["lr"] for opt in trainer.optimizers for g in opt.param_groups],
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "strategy_class": type(trainer.strategy).__name__,
        "threads": torch.get_num_threads(),
    }
    own_summary = getattr(trainer.strategy, "summary_metrics", None)
    if callable(own_summary):
        summary["strategy_summary"] = own_summary()
    if record is not None:
        summary.update(
            batches=record.batches,
            lr_per_batch=record.lrs,
            grad_norms=record.grad_norms,
            epoch_metrics=record.epoch_metrics,
        )
    return summary


def user_error_of(fit: Callable[[], Any]) -> str | None:
    """The one-line error ``fit()`` ended in (``UserError``), or None when it ran through."""
    from lightning_xd.errors import UserError

    try:
        fit()
    except UserError as err:
        return str(err)
    return None


def job_arguments(doc: str | None) -> argparse.Namespace:
    """The flags of a job script (here and in tests/mpi_scripts): ``--out DIR --cases NAME [NAME ...]``."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--out", type=Path, required=True, help="where each case saves what every rank saw")
    parser.add_argument("--cases", nargs="+", required=True, help="the cases to run, in order")
    return parser.parse_args()


def run(out: Path, cases: dict[str, Callable[[Path, str], dict]], names: list[str]) -> None:
    from lightning_xd.comm.communicator import world
    from lightning_xd.errors import UserError

    rank = world().rank
    for name in names:
        case, strategy = name.split("/")
        folder = out / case / strategy
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"started-rank{rank}").touch()
        try:
            result = cases[case](folder, strategy)
        except Exception as err:  # noqa: BLE001  (saved for the test, which decides whether it was expected)
            result = {
                "error": str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}",
                "error_type": type(err).__name__,
                "traceback": traceback.format_exc(),
            }
        torch.save(result, folder / f"rank{rank}.pt")
        print(f"rank {rank}: {name} {'failed: ' + result['error_type'] if 'error' in result else 'done'}", flush=True)
        world().barrier()
