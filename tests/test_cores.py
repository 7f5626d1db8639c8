"""Ranks placed by our mpirun command run as many threads as they have cores, never stacked on one."""

import json
import os

import pytest

from lightning_xd.launch.cores import threads_for


@pytest.mark.parametrize("nprocs", [1, 2])
def test_each_rank_runs_as_many_threads_as_the_cores_it_may_use(mpirun, tmp_path, nprocs):
    machine = sorted(os.sched_getaffinity(0))
    mpirun(nprocs, "report_cores.py", "--out", str(tmp_path / "cores.json"), env={"OMP_NUM_THREADS": ""})
    rows = json.loads((tmp_path / "cores.json").read_text())
    for rank, row in enumerate(rows):
        sharing = sum(1 for other in rows if other["cores"] == row["cores"])
        assert row["threads"] == row["torch_threads"] == max(1, len(row["cores"]) // sharing), (rank, rows)
    if nprocs <= len(machine):  # every core in use, none given twice
        used = [core for row in rows for core in row["cores"]]
        assert sorted(used) == machine, rows


def test_threads_follow_the_cores_a_process_shares():
    four, other_four = frozenset(range(4)), frozenset(range(4, 8))
    assert threads_for(four, [four, other_four]) == 4  # bound to its own 4 cores
    everything = frozenset(range(8))
    assert threads_for(everything, [everything, everything]) == 4  # two unbound ranks share 8 cores
    assert threads_for(frozenset({0}), [frozenset({0})]) == 1
