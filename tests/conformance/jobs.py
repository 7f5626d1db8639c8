"""On the pytest side: start one conformance job under mpirun, and read what its cases saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_mpi_job

HERE = Path(__file__).resolve().parent


class Job:
    """The results of one MPI job's cases (``CASE/STRATEGY``), and its output to show when one is missing."""

    def __init__(self, out: Path, ranks: int, log: str):
        self.out, self.ranks, self.log = out, ranks, log

    def results(self, case: str, strategy: str) -> list[dict]:
        """Every rank's result of the case: its dict, or ``{"error": ..., "traceback": ...}``."""
        folder = self.out / case / strategy
        files = [folder / f"rank{r}.pt" for r in range(self.ranks)]
        if not all(f.exists() for f in files):
            started = sorted(p.name for p in folder.glob("started-rank*")) if folder.exists() else []
            pytest.fail(
                f"case {case}/{strategy} did not finish on every rank (started on: {started or 'none'}); "
                f"the job's output:\n{self.log}"
            )
        return [torch.load(f, weights_only=False) for f in files]

    def ok(self, case: str, strategy: str) -> list[dict]:
        """Every rank's result of a case that must have run through."""
        ranks = self.results(case, strategy)
        for rank, result in enumerate(ranks):
            if "error" in result:
                pytest.fail(f"case {case}/{strategy} failed on rank {rank}:\n{result['traceback']}")
        return ranks


def launch(tmp_path_factory, script: str, ranks: int, names: list[str], timeout: float) -> Job:
    """Run ``python -m mpi4py tests/conformance/SCRIPT OUT NAME...`` on ``ranks`` ranks; a job that fails or
    runs over ``timeout`` still leaves the results of the cases it finished."""
    out = tmp_path_factory.mktemp(Path(script).stem)
    return Job(out, ranks, run_mpi_job(HERE / script, ranks, out, names, timeout))
