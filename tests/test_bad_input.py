"""Bad input is one line ``error: ...`` (exit code 2) from the process the user started, before any
rank of the job exists: values outside their domain, a model on a dataset it cannot train on, wrong
types in a config file, hosts the launch agent cannot reach, a run dir that cannot be written, and a
checkpoint saved by another model, dataset or strategy."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import train as train_script
from lightning_xd.fault_tolerance.checkpoints import CheckpointStore


@pytest.fixture
def launch(one_line_error, no_ranks, tiny_data, tmp_path):
    """``train.py ARGS --nprocs 2 --strategy mpi`` (unless ARGS say otherwise) on the generated Cora, in
    process: the one-line error it gives before the job would start."""

    def run(*argv: str) -> str:
        where = ["--data-dir", str(tiny_data), "--cache-dir", str(tmp_path / "cache")]
        if "--run-dir" not in argv:
            where += ["--run-dir", str(tmp_path / "run")]
        nprocs = [] if "--nprocs" in argv else ["--nprocs", "2"]
        strategy = [] if "--strategy" in argv else ["--strategy", "mpi"]
        return one_line_error(*argv, *nprocs, *strategy, *where)

    return run


# ---- values outside their domain -------------------------------------------------------------
OUT_OF_DOMAIN = [
    ("--max-epochs", "0", []),
    ("--max-epochs", "-3", []),
    ("--max-steps", "0", []),
    ("--max-steps", "-2", []),
    ("--batch-size", "0", []),
    ("--lr", "0", []),
    ("--lr", "-0.1", []),
    ("--lr", "nan", []),
    ("--lr", "inf", []),
    ("--bucket-size-mb", "0", ["--strategy", "mpi"]),
    ("--microbatches", "0", ["--strategy", "hybrid"]),
    ("--pipeline-stages", "0", ["--strategy", "hybrid"]),
    ("--staleness", "-1", ["--strategy", "async"]),
    ("--hidden-channels", "0", []),
    ("--dropout", "1.5", []),
    ("--keep-last", "0", []),
    ("--ckpt-every-steps", "0", []),
    ("--ckpt-every-seconds", "-5", []),
    ("--ckpt-min-seconds", "-1", []),
    ("--log-every-n-steps", "-1", []),
    ("--dashboard-every", "-1", []),
    ("--collective-timeout", "0", []),
    ("--max-restarts", "-1", []),
    ("--seed", "-1", []),
    ("--min-nprocs", "0", []),
]


@pytest.mark.parametrize("flag, value, more", OUT_OF_DOMAIN, ids=[f"{f}={v}" for f, v, _ in OUT_OF_DOMAIN])
def test_value_outside_its_domain_is_one_line_before_the_job_starts(launch, flag, value, more):
    err = launch("--model", "gcn", *more, flag, value)
    assert f"{flag} {value}" in err and "give" in err, err


def test_more_processes_at_least_than_at_most(launch):
    err = launch("--model", "gcn", "--nprocs", "2", "--min-nprocs", "3", "--max-restarts", "1")
    assert "--min-nprocs 3" in err and "--nprocs 2" in err, err


def test_no_limit_and_defaults_are_in_their_domains(launch):
    """-1 steps means no limit and every default is valid: the job would start (and the guard says so)."""
    with pytest.raises(AssertionError, match="the job was started"):
        launch("--model", "gcn", "--max-steps", "-1", "--dashboard-every", "0", "--log-every-n-steps", "0")


def test_a_documented_zero_is_in_its_domain(launch):
    """Example 7's README runs GraphSAGE without its node table: ``--embedding-dim 0``."""
    with pytest.raises(AssertionError, match="the job was started"):
        launch("--model", "graphsage", "--embedding-dim", "0")


# ---- a model on a dataset it cannot train on -------------------------------------------------
@pytest.mark.parametrize(
    "model, data, can",
    [
        ("gcn", "appliances", "cora"),
        ("lstm", "cora", "appliances, sensor-stream"),
        ("graphsage", "qm9", "cora-graph, ppi, synthetic-graph"),
    ],
)
def test_model_on_a_dataset_it_cannot_train_on(data_error, tmp_path, model, data, can):
    """Said before any data is read (the data dir here is empty)."""
    err = data_error(model, tmp_path / "empty", "--data", data)
    assert f"model {model} cannot train on {data}" in err and f"it trains on {can}" in err, err


def test_every_model_trains_on_its_own_dataset_and_says_so_in_the_list(capsys):
    import lightning_xd.datamodules  # noqa: F401
    import lightning_xd.models  # noqa: F401
    from lightning_xd.launch.registry import DATAMODULES, MODELS

    for name in MODELS.names():
        entry = MODELS.get(name)
        assert entry.defaults["data"] == entry.trains_on[0] and set(entry.trains_on) <= set(DATAMODULES.names())
    assert train_script.main(["--list"]) == 0
    lstm = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["lstm"])
    assert "trains on appliances, sensor-stream" in lstm, lstm


# ---- wrong types in a config file ------------------------------------------------------------
@pytest.mark.parametrize(
    "line, key, expected",
    [
        ("max-epochs: ten", "max-epochs", "int"),
        ("lr: [1, 2]", "lr", "float"),
        ("fast-dev-run: maybe", "fast-dev-run", "true or false"),
        ("fault_tolerance: sometimes", "fault_tolerance", "ulfm"),
        ("hidden-channels: [16]", "hidden-channels", "int"),
        ("hidden_channels: many", "hidden_channels", "int"),
        ("dropout: yes", "dropout", "float"),
        ("batch-size: 0", "batch-size", "at least 1"),
    ],
)
def test_wrong_type_in_a_config_file_names_file_key_and_type(launch, tmp_path, line, key, expected):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: gcn\n{line}\n")
    err = launch("--config", str(config))
    assert f"config file {config}, key {key}:" in err and expected in err, err


def test_wrong_type_on_the_command_line_is_one_line(launch):
    err = launch("--model", "gcn", "--max-epochs", "ten")
    assert "--max-epochs" in err and "'ten'" in err, err
    err = launch("--model", "gcn", "--background-checkpoints", "maybe")
    assert "--background-checkpoints" in err and "'maybe'" in err, err


# ---- hosts that do not answer through the launch agent ---------------------------------------
def _agent(tmp_path: Path, silent: str) -> Path:
    """A launch agent that records each call and answers for every host but ``silent``."""
    agent = tmp_path / "agent.sh"
    agent.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "agent-calls"}\n[ "$1" = {silent} ] && exit 255\nexit 0\n')
    agent.chmod(0o755)
    return agent


def _hostfile(tmp_path: Path) -> Path:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\nnode-a slots=1\nnode-b slots=1  # the silent one\n")
    return hostfile


@pytest.mark.parametrize("how", ["--launch-agent", "PRTE_MCA_plm_ssh_agent", "OMPI_MCA_plm_rsh_agent"])
def test_host_that_never_answers_is_an_error_at_start(launch, tmp_path, monkeypatch, how):
    agent = _agent(tmp_path, silent="node-b")
    for name in ("PRTE_MCA_plm_ssh_agent", "OMPI_MCA_plm_rsh_agent"):
        monkeypatch.delenv(name, raising=False)
    given = ["--launch-agent", str(agent)] if how == "--launch-agent" else []
    if not given:
        monkeypatch.setenv(how, str(agent))
    err = launch("--model", "gcn", "--nprocs", "3", "--hostfile", str(_hostfile(tmp_path)), *given)
    assert f"host node-b does not answer through {agent}" in err and "check" in err, err
    assert "stopped answering" not in err
    calls = (tmp_path / "agent-calls").read_text().splitlines()
    assert sorted(c.split()[0] for c in calls) == ["node-a", "node-b"]  # localhost is not asked


def test_the_job_is_started_through_the_agent_the_hosts_were_checked_with(tmp_path, monkeypatch):
    """OMPI_MCA_plm_rsh_agent alone: Open MPI 5 ignores it, so the job is given it as PRRTE's agent."""
    from lightning_xd.fault_tolerance.supervisor import Supervisor, launch_agent

    monkeypatch.delenv("PRTE_MCA_plm_ssh_agent", raising=False)
    monkeypatch.setenv("OMPI_MCA_plm_rsh_agent", "ssh -p 2222")
    assert launch_agent(None) == "ssh -p 2222" and launch_agent("rsh") == "rsh"
    supervisor = Supervisor("train.py", [], tmp_path / "run", 2, None, None, 0, 1, ulfm=False)
    assert supervisor._environment(0)["PRTE_MCA_plm_ssh_agent"] == "ssh -p 2222"
    monkeypatch.setenv("PRTE_MCA_plm_ssh_agent", "no-such-agent : sh -c")  # PRRTE's list: the first installed
    assert launch_agent(None) == "sh -c"
    monkeypatch.delenv("PRTE_MCA_plm_ssh_agent")
    monkeypatch.delenv("OMPI_MCA_plm_rsh_agent")
    assert launch_agent(None) == "ssh"


def test_unreadable_hostfile_is_one_line(launch, tmp_path):
    err = launch("--model", "gcn", "--hostfile", str(tmp_path / "nowhere"))
    assert "hostfile" in err and "not found" in err, err
    bad = tmp_path / "bad-hosts"
    bad.write_text("node-a slots=many\n")
    err = launch("--model", "gcn", "--hostfile", str(bad))
    assert f"hostfile {bad}" in err and "slots=many" in err, err


# ---- a run dir that cannot be written --------------------------------------------------------
def test_run_dir_under_a_file_is_one_line(launch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way\n")
    err = launch("--model", "gcn", "--run-dir", str(blocker / "run"))
    assert f"--run-dir {blocker / 'run'}" in err and f"{blocker} is a file" in err, err
    err = launch("--model", "gcn", "--run-dir", str(blocker))
    assert f"--run-dir {blocker}" in err and "is a file" in err, err


def test_run_dir_in_a_read_only_directory_is_one_line(launch, tmp_path):
    """chattr +i stops even root from creating entries in the directory."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        err = launch("--model", "gcn", "--run-dir", str(locked / "run"))
        assert f"--run-dir {locked / 'run'}" in err and "cannot be written" in err, err
        assert not (locked / "run").exists()
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def _as_unprivileged_user(check, path: Path) -> str:
    """``check(path)`` in a forked child that became user nobody: what its UserError said, or ''."""
    from lightning_xd.errors import UserError

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec (the interpreter may live where nobody cannot read)
        said = b"?"
        try:
            os.setgid(65534)
            os.setuid(65534)
            check(path)
            said = b""
        except UserError as err:
            said = str(err).encode()
        finally:
            os.write(write, said)
            os._exit(0)
    os.close(write)
    said = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    return said


def test_run_dir_check_holds_for_other_users_and_leaves_nothing_behind(tmp_path):
    """As an unprivileged user a directory without write permission is refused; a writable one
    passes, and the check creates nothing in it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the unprivileged user")
    import shutil
    import tempfile

    from lightning_xd.launch.runner import check_run_dir

    base = Path(tempfile.mkdtemp(prefix="xd-run-dir-"))  # in /tmp: pytest's folders are private to root
    try:
        base.chmod(0o755)
        (base / "writable").mkdir()
        (base / "writable").chmod(0o777)
        assert f"--run-dir {base / 'run'} cannot be written" in _as_unprivileged_user(check_run_dir, base / "run")
        assert _as_unprivileged_user(check_run_dir, base / "writable" / "deeper" / "run") == ""
        assert list((base / "writable").iterdir()) == []
    finally:
        shutil.rmtree(base)


# ---- a checkpoint saved by another model, dataset or strategy --------------------------------
def _checkpoint_of(folder: Path, step: int, run: dict | None) -> Path:
    """A committed checkpoint whose manifest says which run wrote it (nothing, as old ones)."""
    store, name = CheckpointStore(folder), f"step-{step:09d}"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "global_step": step}, store.temporary_path(name))
    return store.commit(name, {"global_step": step, "epoch": 0, **({"run": run} if run else {})})


CNN = {"model": "cnn", "data": "cifar10", "strategy": "mpi"}


def test_resume_path_saved_by_another_run(launch, tmp_path):
    path = _checkpoint_of(tmp_path / "elsewhere", 40, CNN)
    err = launch("--model", "gcn", "--strategy", "mpi", "--resume", str(path))
    assert f"checkpoint {path} was saved by model cnn on cifar10 with strategy mpi" in err, err
    assert "this run is gcn on cora with strategy mpi" in err, err


def test_resume_auto_finds_one_saved_by_another_run(launch, tmp_path):
    run_dir = tmp_path / "shared-run"
    path = _checkpoint_of(run_dir / "checkpoints", 40, CNN)
    err = launch("--model", "gcn", "--strategy", "mpi", "--run-dir", str(run_dir))
    assert f"checkpoint {path} was saved by model cnn on cifar10 with strategy mpi" in err, err
    assert "--resume never" in err and "--run-dir" in err, err


def test_checkpoints_that_match_or_predate_the_record_are_resumed(tmp_path, capsys):
    from lightning_xd.launch.runner import choose_checkpoint

    gcn = {"model": "gcn", "data": "cora", "strategy": "mpi"}
    old = _checkpoint_of(tmp_path / "old" / "checkpoints", 10, None)
    assert choose_checkpoint("auto", tmp_path / "old", gcn) == str(old)
    assert choose_checkpoint(str(old), tmp_path / "old", gcn) == str(old)
    same = _checkpoint_of(tmp_path / "same" / "checkpoints", 20, gcn)
    assert choose_checkpoint("auto", tmp_path / "same", gcn) == str(same)
    assert choose_checkpoint("auto", tmp_path / "same") == str(same)  # callers that do not say which run they are
    assert "error" not in capsys.readouterr().out


def test_checkpoint_without_manifest_is_checked_from_its_content(one_line_error, tiny_data, tmp_path):
    """A .ckpt copied without its manifest still carries the record, in the checkpoint callback's state."""
    path = tmp_path / "copied.ckpt"
    torch.save(
        {
            "state_dict": {"w": torch.zeros(3)},
            "global_step": 5,
            "callbacks": {"FaultTolerantCheckpoint": {"manifest_info": {"run": CNN}}},
        },
        path,
    )
    err = one_line_error(
        "--model",
        "gcn",
        "--resume",
        str(path),
        "--data-dir",
        str(tiny_data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert f"checkpoint {path} was saved by model cnn on cifar10 with strategy mpi" in err, err


def test_trained_checkpoint_records_its_run_and_is_refused_by_another(train, tiny_data, tmp_path, launch):
    """End to end: what train.py writes says which model, dataset and strategy wrote it; resuming
    it with another strategy is refused before the job starts."""
    run_dir = tmp_path / "run"
    proc = train("--model", "gcn", "--max-epochs", "2", "--data-dir", str(tiny_data), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest_path = sorted((run_dir / "checkpoints").glob("step-*.json"))[-1]
    manifest = json.loads(manifest_path.read_text())
    assert manifest["run"] == {"model": "gcn", "data": "cora", "strategy": "single"}, manifest
    ckpt = manifest_path.with_suffix(".ckpt")
    err = launch("--model", "gcn", "--strategy", "mpi", "--resume", str(ckpt), "--run-dir", str(tmp_path / "other"))
    assert f"checkpoint {ckpt} was saved by model gcn on cora with strategy single" in err
    assert "this run is gcn on cora with strategy mpi" in err, err
