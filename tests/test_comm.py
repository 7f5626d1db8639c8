"""The comm layer: round trips of several dtypes and shapes, non-contiguous and sparse inputs."""

import pytest
from conftest import run_alone


@pytest.mark.parametrize("ranks", [2, 3])
def test_round_trips_under_mpirun(mpirun, ranks):
    proc = mpirun(ranks, "comm_roundtrips.py")
    assert proc.stdout.count("comm round trips OK") == ranks


def test_round_trips_in_one_process_without_mpirun(tmp_path):
    proc = run_alone("comm_roundtrips.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: comm round trips OK" in proc.stdout


def test_unknown_reduce_op_is_a_clear_error():
    from lightning_xd.comm.communicator import op_name

    assert op_name("AVG") == "mean" and op_name("sum") == "sum"
    with pytest.raises(ValueError, match="unsupported reduce op"):
        op_name("median")
