"""The watchdog watches MPI waits only: a long computation is never taken for a hang, and a wait that
follows a nested watched collective (an on_step ``sync_dist`` log) is still watched."""

import subprocess
import time

from lightning_xd.comm.ulfm import HANG_EXIT_CODE

ULFM = {"XD_FAULT_TOLERANCE": "ulfm"}


def test_a_step_computing_longer_than_the_timeout_is_not_ended(mpirun, tmp_path):
    mpirun(
        2,
        "watchdog_cases.py",
        *("--out", str(tmp_path), "--case", "long-step"),
        mpirun_args=["--with-ft", "ulfm"],
        env=ULFM,
        timeout=120,
    )
    assert (tmp_path / "finished-rank0").read_text().strip() == "4"


def test_a_peer_hung_after_a_nested_collective_ends_the_job(mpirun, tmp_path):
    started = time.monotonic()
    proc = mpirun(
        2,
        "watchdog_cases.py",
        *("--out", str(tmp_path), "--case", "hangs-after-log"),
        mpirun_args=["--with-ft", "ulfm"],
        env=ULFM,
        timeout=90,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (tmp_path / "finished-rank0").exists(), output[-3000:]
    assert "has waited over 2 s" in output, output[-3000:]
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 10  # the hung rank is ended with the job, not left holding its host
    while (
        left := subprocess.run(["pgrep", "-a", "-f", str(tmp_path)], capture_output=True, text=True).stdout.splitlines()
    ) and time.monotonic() < deadline:
        time.sleep(0.5)
    for line in left:
        subprocess.run(["kill", "-9", line.split()[0]])
    assert not left, f"processes of the job still alive after it ended: {left}"
    assert HANG_EXIT_CODE == 75
