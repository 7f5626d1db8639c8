"""benchmarks/chaos.py: a quick run end to end (undisturbed run, one ULFM kill, results file), and
how a trial's record is read from what train.py and its supervisor leave behind.

The end-to-end run covers ULFM only: a supervisor trial costs two more job start-ups, and the
supervisor's restart is itself tested in test_fault_tolerance; its measurement is tested here on
the files it writes.
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO, _env
from generators.ecg import write_ecg5000

from benchmarks import chaos
from benchmarks.chaos_jobs import FAULT_LINE, Job
from benchmarks.chaos_measure import Trial, outcome


def test_quick_run_recovers_a_killed_rank_and_writes_results(tmp_path):
    write_ecg5000(tmp_path / "data")
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "chaos.py"),
        "--quick",
        "--nprocs",
        "2",
        "--modes",
        "ulfm",
        "--data-dir",
        str(tmp_path / "data"),
        "--work-dir",
        str(tmp_path / "work"),
        "--results-dir",
        str(tmp_path / "results"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    content = json.loads((tmp_path / "results" / "chaos-quick.json").read_text())
    baseline = content["baseline"]
    assert content["machine"]["cores"] >= 1 and baseline["global_step"] > 0 and 0 <= baseline["test_auroc"] <= 1
    summary, (trial,) = content["modes"]["ulfm"]["summary"], content["modes"]["ulfm"]["trials"]
    assert summary["trials"] == summary["recovered"] == 1 and summary["success_rate"] == 1.0
    assert content["verdict"]["all_recovered"]
    assert trial["lost_ranks"] == [trial["rank"]] and trial["world_size"] == 1 and trial["steps_redone"] == 0
    # the kill is timed by the arrival of the injector's line, so no lower bound on the time here
    assert 0 <= trial["step"] < baseline["global_step"] and trial["time_to_recover_s"] < 60 and trial["shrink_s"] > 0
    assert "| ulfm | 1/1 |" in proc.stdout


def _finished_job(tmp_path, metrics: dict, fault_at: float = 100.0) -> Job:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "COMPLETED").write_text("1\n")
    log = tmp_path / "run.log"
    log.write_text("fault injection: kill on pid 1\n")
    return Job(run_dir, log, returncode=0, wall_time_s=30.0, fault_at=fault_at)


def test_supervisor_trial_is_timed_from_the_kill_to_the_next_attempts_first_step(tmp_path):
    metrics = {
        "test/auroc": 0.98,
        "world_size": 3,
        "global_step": 120,
        "supervisor/restarts": 1,
        "supervisor/downtime_s": [24.0],
        "supervisor/steps_redone": [13],
        "supervisor/attempts": [{"attempt": 0, "updated_at": 100.5}, {"attempt": 1, "training_started_at": 125.0}],
    }
    record = outcome(_finished_job(tmp_path, metrics), Trial("supervisor", 0, 2, 53), baseline_steps=120, nprocs=3)
    assert record["recovered"], record["problem"]
    assert record["time_to_recover_s"] == 25.0 and record["downtime_s"] == 24.0 and record["steps_redone"] == 13


@pytest.mark.parametrize(
    "metrics, fault_at, problem",
    [
        ({"test/auroc": 0.98, "world_size": 3, "global_step": 120}, 100.0, "no in-job recovery"),
        ({"test/auroc": float("nan"), "world_size": 2, "global_step": 130}, 100.0, "test/auroc is nan"),
        ({"test/auroc": 0.98, "world_size": 2, "global_step": 90}, 100.0, "before the undisturbed run's 120"),
        ({"test/auroc": 0.98, "world_size": 3, "global_step": 120}, None, "the fault never happened"),
    ],
)
def test_a_trial_that_did_not_recover_says_why(tmp_path, metrics, fault_at, problem):
    record = outcome(_finished_job(tmp_path, metrics, fault_at), Trial("ulfm", 0, 1, 40), baseline_steps=120, nprocs=3)
    assert not record["recovered"] and problem in record["problem"], record["problem"]
    assert "fault injection" in record["log_tail"]


def test_fault_line_gives_the_kill_time_when_the_injector_prints_one():
    assert FAULT_LINE.search("fault injection: kill on pid 42 at 1796163436.25")["at"] == "1796163436.25"
    assert FAULT_LINE.search("fault injection: hang on pid 42")["at"] is None


@pytest.mark.parametrize(
    "argv, expected",
    [(["--trials", "0"], "--trials must be at least 1"), (["--nprocs", "1"], "--nprocs must be at least 2")],
)
def test_impossible_options_are_one_line_errors(capsys, argv, expected):
    assert chaos.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
