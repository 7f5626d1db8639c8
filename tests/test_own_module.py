"""The README's "Use a strategy in your own Lightning project": its script, with a LightningModule of
the user's own and ``Trainer(strategy="mpi")``, trains on two processes when started by mpirun and
by ``python -m lightning_xd.launch``; the launcher's bad input is one line, exit code 2."""

import re
import subprocess
import sys

import pytest
from conftest import REPO, _env

SCRIPT = REPO / "examples" / "own_module" / "train_my_module.py"


def test_the_readme_shows_the_script_as_it_is():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert SCRIPT.read_text() in blocks, "README.md must show examples/own_module/train_my_module.py verbatim"


def reports(output: str) -> list[tuple[int, int, int, str]]:
    return sorted(
        (int(r), int(w), int(s), loss)
        for r, w, s, loss in re.findall(r"rank (\d+) of (\d+): (\d+) steps, loss ([\d.]+)", output)
    )


@pytest.mark.parametrize("started_by", ["mpirun", "lightning_xd.launch"])
def test_your_own_module_trains_on_two_processes(tmp_path, started_by):
    from lightning_xd.launch.launcher import mpirun_command, mpirun_environment

    if started_by == "mpirun":
        cmd = mpirun_command(2, [str(SCRIPT)], mpirun_args=["--with-ft", "ulfm"])
    else:
        cmd = [sys.executable, "-m", "lightning_xd.launch", "--nprocs", "2", str(SCRIPT)]
    env = {**mpirun_environment(), **_env(tmp_path)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = reports(proc.stdout)
    # 256 samples, batches of 16, two epochs: 8 steps per epoch on each of two processes, one loss everywhere
    assert [(r, w, s) for r, w, s, _ in found] == [(0, 2, 16), (1, 2, 16)], proc.stdout[-3000:]
    assert found[0][3] == found[1][3]


@pytest.mark.parametrize(
    "argv, says",
    [(["--nprocs", "0", str(SCRIPT)], "--nprocs 0 is out of range"), (["missing.py"], "script missing.py not found")],
)
def test_the_launcher_refuses_bad_input_in_one_line(tmp_path, argv, says):
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_xd.launch", *argv],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and says in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
