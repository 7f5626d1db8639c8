"""Shared fixtures: tiny generated datasets and helpers that run train.py or scripts under mpirun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from generators.planetoid import write_planetoid_cora  # noqa: E402

# The generated Planetoid and CIFAR-10 pickles are not the published releases: accept them (they are
# still read by the restricted unpickler); the tests of the refusal take this away.
os.environ["XD_TRUST_DATA_DIR"] = "1"


def _env(tmp: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(XD_CACHE_DIR=str(tmp / "cache"), XD_DOWNLOAD="0", PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    env.update(extra or {})
    return env


@pytest.fixture(autouse=True)
def _restore_environment():
    """Tests that run train.main in process must not leak what it sets (``seed_everything`` exports
    PL_GLOBAL_SEED) into the subprocesses of later tests, whose references assume a clean environment."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data dir laid out like ../shared/data, with small generated files."""
    root = tmp_path_factory.mktemp("data")
    write_planetoid_cora(root)
    return root


@pytest.fixture
def train(tmp_path):
    """Run ``python train.py ARGS`` in a subprocess; returns the CompletedProcess."""

    def run(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(REPO / "train.py"), *args]
        return subprocess.run(
            cmd, cwd=tmp_path, env=_env(tmp_path, env), capture_output=True, text=True, timeout=timeout
        )

    return run


@pytest.fixture
def one_line_error(capsys):
    """Run ``train.main(ARGS)`` in process: bad input must give one line ``error: ...`` and exit code 2."""
    import train as train_script

    def run(*argv: str) -> str:
        code = train_script.main(list(argv))
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err

    return run


@pytest.fixture
def no_ranks(monkeypatch):
    """Fails the test if the job's processes would be started (the supervisor builds their command
    line just before it starts them)."""
    from lightning_xd.fault_tolerance.supervisor import Supervisor

    def refuse(self, env):
        raise AssertionError("the job was started: the bad input was not caught in the launching process")

    monkeypatch.setattr(Supervisor, "_command", refuse)


@pytest.fixture
def data_error(one_line_error, tmp_path):
    """The one-line error of ``train.py --model MODEL ARGS`` on the data under ``data_dir``."""

    def run(model: str, data_dir: Path, *args: str) -> str:
        return one_line_error(
            "--model", model, *args, "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache")
        )

    return run


@pytest.fixture
def bad_file_error(data_error, tmp_path, monkeypatch):
    """The one-line error of ``train.py --model MODEL`` when its data is the one file ``relative`` of a data
    dir (holding ``content``, or missing where ``content`` is None), with downloads off."""

    def run(model: str, relative: str, content: str | None) -> str:
        monkeypatch.setenv("XD_DOWNLOAD", "0")
        path = tmp_path / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is not None:
            path.write_text(content)
        return data_error(model, tmp_path / "data")

    return run


def ready_datamodule(datamodule_class, data_dir: Path, tmp_path: Path, **options):
    """``datamodule_class(data_dir, cache)`` prepared and set up, outside any Trainer."""
    datamodule = datamodule_class(str(data_dir), str(tmp_path / "cache"), **options)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def run_alone(script: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python tests/mpi_scripts/SCRIPT ARGS`` without mpirun (an MPI singleton: world size 1) in ``cwd``."""
    cmd = [sys.executable, str(REPO / "tests" / "mpi_scripts" / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout)


def run_mpi(
    n: int,
    script: str,
    *args: str,
    cwd: Path,
    timeout: float = 180,
    mpirun_args=(),
    check: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m mpi4py tests/mpi_scripts/SCRIPT ARGS`` on ``n`` ranks under a timeout; with ``check``,
    a non-zero exit (or the timeout) fails the calling test and shows the job's output."""
    from lightning_xd.launch.launcher import mpirun_command, mpirun_environment

    cmd = mpirun_command(n, [str(REPO / "tests" / "mpi_scripts" / script), *args], mpirun_args=mpirun_args)
    if n > (os.cpu_count() or 1) and "--oversubscribe" not in cmd:
        cmd.insert(1, "--oversubscribe")
    env = {**mpirun_environment(), **_env(Path(cwd)), **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        output = lambda b: (b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))[-4000:]  # noqa: E731
        pytest.fail(f"mpirun ran over {timeout} s\n--- stdout\n{output(err.stdout)}\n--- stderr\n{output(err.stderr)}")
    if check and proc.returncode != 0:
        pytest.fail(
            f"mpirun exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def run_mpi_job(script: Path, ranks: int, out: Path, cases: list[str], timeout: float) -> str:
    """Run ``python -m mpi4py SCRIPT --out OUT --cases CASE...`` on ``ranks`` ranks (oversubscribed beyond the
    cores) for a job whose cases save their own results under ``out``; returns how it ended and the end of its
    output.
    A job that fails or runs over ``timeout`` is not an error here: the cases it finished still count."""
    from lightning_xd.launch.launcher import mpirun_command, mpirun_environment

    cmd = mpirun_command(ranks, [str(script), "--out", str(out), "--cases", *cases])
    if ranks > (os.cpu_count() or 1) and "--oversubscribe" not in cmd:
        cmd.insert(1, "--oversubscribe")
    proc = subprocess.Popen(
        cmd,
        cwd=out,
        env={**mpirun_environment(), **_env(out)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        ending = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.terminate()  # mpirun ends its processes
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        ending = f"timed out after {timeout} s"
    return f"job {ending}\n{output[-6000:]}"


@pytest.fixture
def mpirun(tmp_path):
    """Run ``python -m mpi4py SCRIPT ARGS`` on ``n`` ranks; fails the test on a non-zero exit."""

    def run(
        n: int,
        script: str,
        *args: str,
        timeout: float = 180,
        mpirun_args=(),
        check: bool = True,
        env: dict | None = None,
    ) -> subprocess.CompletedProcess:
        return run_mpi(n, script, *args, cwd=tmp_path, timeout=timeout, mpirun_args=mpirun_args, check=check, env=env)

    return run
