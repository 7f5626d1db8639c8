"""Atomic writes (``lightning_xd.files``) and the job read from the launcher's variables
(``lightning_xd.comm.environment``), without MPI."""

import json

import pytest

from lightning_xd.comm.environment import (
    in_mpi_job,
    is_first_process,
    rank_from_environment,
    size_from_environment,
)
from lightning_xd.files import atomic_write, write_json_atomically

LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE")


def test_json_is_written_whole_and_leaves_no_temporary(tmp_path):
    path = write_json_atomically(tmp_path / "new" / "metrics.json", {"b": 1, "a": float("nan")})
    assert json.loads(path.read_text())["b"] == 1 and path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
    write_json_atomically(path, {"c": 2}, durable=True)
    assert json.loads(path.read_text()) == {"c": 2}


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "cache.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["cache.pt"]


@pytest.mark.parametrize(
    "variables, rank, size",
    [
        ({}, None, None),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, 1, 2),
        ({"PMIX_RANK": "0"}, 0, None),
        ({"PMI_RANK": "3", "PMI_SIZE": "4"}, 3, 4),
        ({"OMPI_COMM_WORLD_RANK": "2", "PMIX_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}, 2, 3),
    ],
)
def test_every_launcher_is_read_alike(monkeypatch, variables, rank, size):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert rank_from_environment() == rank and size_from_environment() == size
    assert in_mpi_job() == bool(variables)
    assert is_first_process() == (rank in (None, 0))
