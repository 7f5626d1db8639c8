"""What code outside a strategy may ask of it: the extension points, with their defaults.

Callbacks, the runner and the benchmarks work with any Lightning strategy (ours, Lightning's own
DDP, one process). They ask through ``declared(strategy)``, which answers with the strategy itself
when it declares this contract and with the defaults otherwise, so no caller probes a strategy's
attributes by name. A strategy overrides only what differs from the defaults.
"""

from __future__ import annotations

from typing import Any


class StrategyContract:
    """The extension points of a strategy, each with the default of plain synchronous training."""

    saves_own_checkpoints: bool = False
    """The strategy writes the run's checkpoints itself (the checkpoint callback then writes none)."""

    is_synchronous: bool = True
    """Every process takes every step together, so metrics may be gathered while training runs."""

    supports_in_job_recovery: bool = False
    """A lost process is survived inside the job (ULFM) instead of ending it."""

    batch_sharing_processes: int = 1
    """Processes that work on each batch together (a pipeline's stages); throughput divides by it."""

    max_processes: int | None = None
    """The most processes the strategy can run on (None: any number)."""

    @staticmethod
    def check_settings(nprocs: int, model: Any = None) -> None:
        """Refuse, with one line, settings that cannot work: called before any process starts (with the
        model) and by every rank. Parameters named like the strategy's own are passed by name."""

    def summary_metrics(self) -> dict[str, Any]:
        """Figures for metrics.json at the end of the run (on rank 0)."""
        return {}

    def recoveries(self) -> list[dict[str, Any]]:
        """The processes lost and survived in this job, one record per recovery."""
        return []

    def peer_wait_seconds(self) -> float | None:
        """Seconds this process has spent blocked waiting on the others so far (a cumulative counter,
        read before and after a step); None where the strategy does not count them."""
        return None


_DEFAULTS = StrategyContract()


def declared(strategy: Any) -> StrategyContract:
    """``strategy`` (an instance or a class) if it declares the contract, else the defaults."""
    if isinstance(strategy, StrategyContract):
        return strategy
    if isinstance(strategy, type) and issubclass(strategy, StrategyContract):
        return strategy  # class attributes and static methods answer for the class
    return _DEFAULTS
